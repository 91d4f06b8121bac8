/* sae-kernels feature dashboard: plain JavaScript, no server, no network.
   Data: data/features.js and data/latents/NNNNN.js call SAEDash.data(name, json) (see analysis/). */
(function () {
  "use strict";
  var S = { docs: {}, waiting: {}, sum: null, order: [], page: 0, pageSize: 1000, sortKey: "score",
            sortAsc: false, filter: "", hideDead: false, selected: null, links: null, compares: [] };
  var el = function (tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    (kids || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  };
  var fmt = function (x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return x.toPrecision(3);
  };
  var pct = function (x) { return x === 0 ? "0" : (x * 100 < 0.01 ? (x * 100).toExponential(1) : (x * 100).toPrecision(3)) + "%"; };

  function tokText(id) {
    var t = S.sum.vocab[String(id)];
    return t === undefined ? "<" + id + ">" : t;
  }
  function shown(t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

  // ------------------------------------------------------------------ loading data files
  window.SAEDash = {
    data: function (name, doc) {
      S.docs[name] = doc;
      var cbs = S.waiting[name] || [];
      delete S.waiting[name];
      cbs.forEach(function (cb) { cb(doc); });
      if (name === "compares") { S.compares = doc; if (S.sum) renderHeader(); }
    },
    links: function (l) { S.links = l; },
    start: start,
    state: S
  };
  function load(name, cb) {
    if (S.docs[name]) { cb(S.docs[name]); return; }
    if (S.waiting[name]) { S.waiting[name].push(cb); return; }
    S.waiting[name] = [cb];
    var s = document.createElement("script");
    s.src = "data/" + name.replace(/\.json$/, ".js");
    s.onerror = function () { show(el("p", { cls: "empty", text: "could not load " + s.src })); };
    document.body.appendChild(s);
  }

  // ------------------------------------------------------------------ page
  function start() {
    S.sum = S.docs["features.json"];
    if (!S.sum) { document.body.appendChild(el("p", { text: "data/features.js did not load" })); return; }
    var L = S.sum.latents;
    S.n = L.frequency.length;
    S.dead = new Uint8Array(S.n);
    S.sum.dead.forEach(function (i) { S.dead[i] = 1; });
    S.dominated = new Uint8Array(S.n);
    (S.sum.dominated || []).forEach(function (i) { S.dominated[i] = 1; });
    S.sortKeys = ["id", "frequency", "mean", "max"];
    if (L.score && L.score.length === S.n) S.sortKeys.push("score");
    if (L.docs && L.docs.length === S.n) S.sortKeys.push("docs");
    if (S.sortKeys.indexOf(S.sortKey) < 0) S.sortKey = "frequency";  // analysis data from before the score
    renderHeader();
    renderOverview();
    renderList();
    window.addEventListener("hashchange", fromHash);
    fromHash();
  }

  function renderHeader() {
    var s = S.sum, h = document.getElementById("head");
    h.innerHTML = "";
    h.appendChild(el("h1", { text: s.sae.name + " \u2014 " + s.sae.d_sae + " latents" }));
    var c = s.corpus;
    h.appendChild(el("div", { cls: "meta", text: s.model + " \u00b7 layer " + s.sae.layer + " " + s.sae.position +
      " (" + s.sae.hook_point_in + ") \u00b7 k " + s.sae.k + " \u00b7 corpus: " + c.dataset + ", " + c.n_contexts +
      " contexts x " + c.context_len + " tokens (" + c.tokens + " non-special" +
      (c.documents !== undefined ? ", " + c.documents + " documents" : "") + "; " + c.rule + ")" }));
    var nav = el("nav", { cls: "members" });
    var links = S.links || { members: [] };
    if (links.suite) nav.appendChild(el("a", { href: links.suite, text: "suite overview" }));
    if (links.members.length > 1) {
      nav.appendChild(el("span", { text: "SAEs:" }));
      links.members.forEach(function (m) {
        nav.appendChild(m.here ? el("span", { cls: "here", text: m.name }) : el("a", { href: m.href, text: m.name }));
      });
    }
    if (S.compares.length) {
      nav.appendChild(el("span", { text: "compare:" }));
      S.compares.forEach(function (m) { nav.appendChild(el("a", { href: m.href, text: "vs " + m.name })); });
    }
    if (nav.childNodes.length) h.appendChild(nav);
  }

  function renderOverview() {
    var s = S.sum, o = document.getElementById("overview");
    o.innerHTML = "";
    o.appendChild(el("h2", { text: "Overview" }));
    var st = el("div", { cls: "stats" });
    var add = function (k, v) { st.appendChild(el("span", {}, [k + " ", el("b", { text: v })])); };
    add("live", String(s.density.live));
    add("dead", String(s.density.dead) + " (" + pct(s.density.dead / S.n) + ")");
    var L = s.latents;
    if (L.examples && L.examples.length === S.n) {
      var ex = [], top = s.settings.top_n, full = 0;
      for (var i = 0; i < S.n; i++) if (!S.dead[i]) { ex.push(L.examples[i]); if (L.examples[i] >= top) full++; }
      ex.sort(function (a, b) { return a - b; });
      if (ex.length) add("examples per live latent", "median " + ex[ex.length >> 1] + ", " + full + " with all " + top);
    }
    if (s.dominated && s.dominated.length) add("one document dominates", String(s.dominated.length) + " latents");
    var ev = s.sae.eval || {};
    if (ev.explained_variance !== undefined) add("EV", ev.explained_variance.toFixed(4));
    if (ev.l0 !== undefined) add("L0", ev.l0.toFixed(2));
    if (ev.delta_lm_loss !== undefined) add("\u0394 LM loss", ev.delta_lm_loss.toFixed(4));
    o.appendChild(st);
    o.appendChild(el("div", { cls: "legend", text: "Latent density: how many latents fire on each fraction of tokens (log10 frequency); red: dead (never active on this corpus)" }));
    o.appendChild(densitySvg(s.density));
  }

  function svgEl(tag, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function bars(values, labels, opts) {
    var W = opts.width || 440, H = opts.height || 120, pad = 22, n = values.length;
    var svg = svgEl("svg", { width: W, height: H + pad, viewBox: "0 0 " + W + " " + (H + pad), id: opts.id || "" });
    var mx = Math.max.apply(null, values.concat([1]));
    var bw = (W - 46) / Math.max(n, 1);
    values.forEach(function (v, i) {
      var h = v / mx * (H - 10);
      var r = svgEl("rect", { x: 30 + i * bw, y: H - h, width: Math.max(bw - 1, 1), height: h,
        "class": "bar" + (opts.redLast && i === n - 1 ? " deadbar" : "") });
      var t = svgEl("title", {}); t.textContent = labels[i] + ": " + v; r.appendChild(t);
      svg.appendChild(r);
    });
    var ticks = opts.ticks || [];
    ticks.forEach(function (tk) {
      var tx = svgEl("text", { x: 30 + tk[0] * bw, y: H + 14, "text-anchor": "middle" }); tx.textContent = tk[1];
      svg.appendChild(tx);
    });
    var ty = svgEl("text", { x: 2, y: 10 }); ty.textContent = String(mx); svg.appendChild(ty);
    svg.appendChild(svgEl("line", { x1: 30, y1: H, x2: W, y2: H, stroke: "#bbb" }));
    return svg;
  }
  function densitySvg(d) {
    var vals = d.counts.slice(), labels = [], ticks = [];
    for (var i = 0; i < vals.length; i++) {
      labels.push("1e" + d.edges_log10[i] + " .. 1e" + d.edges_log10[i + 1]);
      if (d.edges_log10[i] % 1 === 0) ticks.push([i, "1e" + d.edges_log10[i]]);
    }
    vals.push(d.dead); labels.push("dead"); ticks.push([vals.length - 0.5, "dead"]);
    return bars(vals, labels, { id: "density", redLast: true, ticks: ticks, width: 460 });
  }

  // ------------------------------------------------------------------ the feature list
  function matches(i, q) {
    if (q === "") return true;
    var L = S.sum.latents;
    var num = q.replace(/^#/, "");
    if (/^\d+$/.test(num)) return String(i) === num;
    var ql = q.toLowerCase();
    var hit = function (id) { return tokText(id).trim().toLowerCase().indexOf(ql) >= 0; };
    return (L.peak_tokens[i] || []).some(hit) || ((L.logit_tokens || [])[i] || []).some(hit);
  }
  function sortOrder() {
    var L = S.sum.latents, key = S.sortKey, asc = S.sortAsc ? 1 : -1;
    var ids = [];
    var q = S.filter.trim();
    for (var i = 0; i < S.n; i++) if ((!S.hideDead || !S.dead[i]) && matches(i, q)) ids.push(i);
    if (key !== "id") ids.sort(function (a, b) { return (L[key][a] - L[key][b]) * asc || a - b; });
    else if (!S.sortAsc) ids.reverse();
    S.order = ids;
  }
  function renderList() {
    var box = document.getElementById("list");
    box.innerHTML = "";
    box.appendChild(el("h2", { text: "Latents" }));
    var ctr = el("div", { cls: "controls" });
    var search = el("input", { type: "search", id: "search", placeholder: "search: latent id (e.g. 42) or token text" });
    search.value = S.filter;
    search.addEventListener("input", function () { S.filter = search.value; S.page = 0; refresh(); });
    var hide = el("input", { type: "checkbox", id: "hide-dead" });
    hide.checked = S.hideDead;
    hide.addEventListener("change", function () { S.hideDead = hide.checked; S.page = 0; refresh(); });
    ctr.appendChild(search);
    ctr.appendChild(el("label", {}, [hide, " hide dead"]));
    box.appendChild(ctr);
    var pager = el("div", { cls: "controls pager", id: "pager" });
    box.appendChild(pager);
    var wrap = el("div", { cls: "tablewrap" });
    var table = el("table", { id: "features" });
    var head = el("tr");
    var cols = [["id", "latent"]];
    if (S.sortKeys.indexOf("score") >= 0) cols.push(["score", "score"]);
    cols = cols.concat([["frequency", "frequency"], ["mean", "mean act"], ["max", "max act"]]);
    if (S.sortKeys.indexOf("docs") >= 0) cols.push(["docs", "docs"]);
    cols.push([null, "top tokens"]);
    cols.forEach(function (c) {
      var th = el("th", { text: c[1], cls: c[0] ? "" : "toks" });
      if (c[0]) {
        th.setAttribute("data-sort", c[0]);
        th.addEventListener("click", function () {
          if (S.sortKey === c[0]) S.sortAsc = !S.sortAsc; else { S.sortKey = c[0]; S.sortAsc = c[0] === "id"; }
          th.title = "";
          S.page = 0; refresh();
        });
      }
      head.appendChild(th);
    });
    table.appendChild(el("thead", {}, [head]));
    table.appendChild(el("tbody", { id: "feature-rows" }));
    wrap.appendChild(table);
    box.appendChild(wrap);
    refresh();
  }
  function refresh() {
    sortOrder();
    var L = S.sum.latents, tb = document.getElementById("feature-rows");
    document.querySelectorAll("#features th").forEach(function (th) {
      var on = th.getAttribute("data-sort") === S.sortKey;
      th.classList.toggle("sorted", on);
      th.classList.toggle("asc", on && S.sortAsc);
    });
    tb.innerHTML = "";
    var a = S.page * S.pageSize, b = Math.min(S.order.length, a + S.pageSize);
    var frag = document.createDocumentFragment();
    for (var r = a; r < b; r++) {
      var i = S.order[r];
      var seen = {}, toks = (L.peak_tokens[i] || []).filter(function (t) { return seen[t] ? false : (seen[t] = 1); })
        .slice(0, 4).map(function (t) { var x = tokText(t); return JSON.stringify(x.length > 14 ? x.slice(0, 13) + "\u2026" : x); }).join(" ");
      var idCell = el("td", { text: String(i) });
      if (S.dead[i]) idCell.appendChild(el("span", { cls: "badge", text: "dead" }));
      var cells = [idCell];
      if (S.sortKeys.indexOf("score") >= 0) cells.push(el("td", { text: S.dead[i] ? "" : L.score[i].toFixed(3) }));
      cells.push(el("td", { text: pct(L.frequency[i]) }), el("td", { text: fmt(L.mean[i]) }), el("td", { text: fmt(L.max[i]) }));
      if (S.sortKeys.indexOf("docs") >= 0) {
        var dc = el("td", { text: S.dead[i] ? "" : String(L.docs[i]) });
        if (S.dominated[i]) { dc.appendChild(el("span", { cls: "badge", text: "mostly 1 doc", title: L.doc_max[i] + " of " + L.examples[i] + " examples from one document" })); }
        cells.push(dc);
      }
      cells.push(el("td", { cls: "toks", text: toks }));
      var tr = el("tr", { cls: "feat" + (S.dead[i] ? " dead" : "") + (i === S.selected ? " selected" : ""),
        "data-feature-id": String(i) }, cells);
      tr.addEventListener("click", (function (id) { return function () { location.hash = "latent=" + id; }; })(i));
      frag.appendChild(tr);
    }
    tb.appendChild(frag);
    var pg = document.getElementById("pager");
    pg.innerHTML = "";
    var prev = el("button", { text: "\u2190", id: "prev" }), next = el("button", { text: "\u2192", id: "next" });
    prev.disabled = S.page === 0;
    next.disabled = b >= S.order.length;
    prev.addEventListener("click", function () { S.page--; refresh(); });
    next.addEventListener("click", function () { S.page++; refresh(); });
    pg.appendChild(prev);
    pg.appendChild(el("span", { id: "shown", text: (S.order.length ? (a + 1) + "\u2013" + b : "0") + " of " + S.order.length +
      " latents (" + S.n + " in the SAE)" }));
    pg.appendChild(next);
  }

  // ------------------------------------------------------------------ one latent
  // #latent=N opens a latent; #q=TEXT searches; #sort=score|frequency|mean|max|docs|id (&asc=1); joined by &
  function fromHash() {
    var h = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) h[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    var relist = false;
    if (h.q !== undefined && h.q !== S.filter) { S.filter = h.q; document.getElementById("search").value = h.q; relist = true; }
    if (h.sort && S.sortKeys.indexOf(h.sort) >= 0 && h.sort !== S.sortKey) { S.sortKey = h.sort; relist = true; }
    if (h.asc !== undefined && (h.asc === "1") !== S.sortAsc) { S.sortAsc = h.asc === "1"; relist = true; }
    if (relist) { S.page = 0; refresh(); }
    if (h.latent !== undefined) select(parseInt(h.latent, 10));
  }
  function show(node) {
    var p = document.getElementById("panel");
    p.innerHTML = "";
    p.appendChild(node);
  }
  function select(i) {
    if (!(i >= 0 && i < S.n)) { show(el("p", { cls: "empty", text: "no latent " + i })); return; }
    S.selected = i;
    document.querySelectorAll("tr.feat.selected").forEach(function (r) { r.classList.remove("selected"); });
    var row = document.querySelector('tr.feat[data-feature-id="' + i + '"]');
    if (row) row.classList.add("selected");
    var size = S.sum.chunks.size, c = Math.floor(i / size);
    load(S.sum.chunks.files[c], function (doc) { renderLatent(doc.latents[i - doc.first]); });
  }
  function contextLine(c, peakMax, cls) {
    var line = el("div", { cls: "ctx " + (cls || "") });
    line.appendChild(el("span", { cls: "val", text: fmt(c.value) }));
    if (c.doc !== undefined) {
      var held = c.ctx < (S.sum.corpus.held_out_contexts || 0);
      line.setAttribute("data-doc", String(c.doc));
      line.appendChild(el("span", { cls: "doc", text: "d" + c.doc + (held ? "*" : ""),
        title: "document " + c.doc + ", context " + c.ctx + (held ? " (held out: the SAE never trained on it)" : "") }));
    }
    c.tokens.forEach(function (t, j) {
      var a = c.acts[j], alpha = peakMax > 0 ? Math.min(1, a / peakMax) : 0;
      var txt = tokText(t);
      var sp = el("span", { cls: "tok" + (c.start + j === c.pos ? " peak" : "") + (a === 0 && /^<.*>$/.test(txt) ? " special" : ""),
        "data-act": String(a), "data-token": String(t), title: JSON.stringify(txt) + "  act " + fmt(a) });
      sp.textContent = shown(txt);
      if (a > 0) sp.style.backgroundColor = "rgba(255, 112, 0, " + alpha.toFixed(3) + ")";
      line.appendChild(sp);
    });
    return line;
  }
  function renderLatent(rec) {
    var s = S.sum, L = s.latents, i = rec.id;
    var box = el("div", { id: "latent", "data-latent": String(i) });
    box.appendChild(el("h2", { text: "Latent " + i + (S.dead[i] ? " (dead)" : "") }));
    var st = el("div", { cls: "stats" });
    var add = function (k, v) { st.appendChild(el("span", {}, [k + " ", el("b", { text: v })])); };
    add("frequency", pct(L.frequency[i]) + " (" + L.count[i] + " tokens)");
    add("mean", fmt(L.mean[i]));
    add("max", fmt(L.max[i]));
    if (L.score && !S.dead[i]) add("score", L.score[i].toFixed(3) + " (concentration " + L.concentration[i].toFixed(3) + ")");
    if (L.docs && L.docs.length === S.n && !S.dead[i]) add("examples", L.examples[i] + " from " + L.docs[i] + " document" + (L.docs[i] === 1 ? "" : "s"));
    box.appendChild(st);
    if (S.dominated[i]) box.appendChild(el("div", { cls: "warn", id: "dominated", text: L.doc_max[i] + " of its " + L.examples[i] +
      " top examples come from one document: they may show that document more than the latent" }));
    var mx = L.max[i];
    box.appendChild(el("h3", { text: "Top examples (by peak activation, windows never overlapping; shading: activation / max" +
      (rec.top.length && rec.top[0].doc !== undefined ? "; d<N>: the document, *: held out" : "") + ")" }));
    var top = el("div", { id: "top-contexts" });
    if (!rec.top.length) top.appendChild(el("p", { cls: "empty", text: "never active on this corpus" }));
    rec.top.forEach(function (c) { top.appendChild(contextLine(c, mx, "top")); });
    box.appendChild(top);
    if (rec.nearest && rec.nearest.length) {
      box.appendChild(el("h3", { text: "Nearest latents (decoder cosine)" }));
      var nt = el("table", { id: "nearest" }, [el("tr", {}, [el("th", { cls: "toks", text: "latent" }), el("th", { text: "cosine" }),
        el("th", { text: "frequency" }), el("th", { cls: "toks", text: "top tokens" })])]);
      rec.nearest.forEach(function (p) {
        var j = p[0], seen = {};
        var toks = (L.peak_tokens[j] || []).filter(function (t) { return seen[t] ? false : (seen[t] = 1); }).slice(0, 4)
          .map(function (t) { return JSON.stringify(tokText(t)); }).join(" ");
        nt.appendChild(el("tr", { cls: "near", "data-near-id": String(j) }, [el("td", { cls: "toks" }, [el("a", { href: "#latent=" + j, text: "#" + j })]),
          el("td", { text: p[1].toFixed(3) }), el("td", { text: S.dead[j] ? "dead" : pct(L.frequency[j]) }), el("td", { cls: "toks", text: toks })]));
      });
      box.appendChild(el("div", { cls: "nearest" }, [nt]));
    }
    if (rec.hist.counts.length) {
      box.appendChild(el("h3", { text: "Activation histogram (log-spaced bins)" }));
      var labels = [], ticks = [], E = s.hist_edges;
      rec.hist.counts.forEach(function (_, j) {
        var b = rec.hist.first_bin + j;
        labels.push(fmt(E[b]) + " .. " + fmt(E[b + 1]));
        if (j % 4 === 0) ticks.push([j, fmt(E[b])]);
      });
      box.appendChild(bars(rec.hist.counts, labels, { id: "hist", ticks: ticks, width: 420, height: 90 }));
    }
    if (rec.logits) {
      box.appendChild(el("h3", { text: "Direct logit effect (per unit activation)" }));
      var lg = el("div", { cls: "logits", id: "logits" });
      [["promotes", rec.logits.top, "pos"], ["suppresses", rec.logits.bottom, "neg"]].forEach(function (g) {
        var t = el("table", {}, [el("tr", {}, [el("th", { cls: "toks", text: g[0] }), el("th", { text: "effect" })])]);
        g[1].forEach(function (p) {
          t.appendChild(el("tr", {}, [el("td", { cls: "toks", text: JSON.stringify(tokText(p[0])) }), el("td", { cls: g[2], text: fmt(p[1]) })]));
        });
        lg.appendChild(t);
      });
      box.appendChild(lg);
    }
    rec.samples.slice().reverse().forEach(function (g) {
      box.appendChild(el("h3", { text: "Sampled: quantile " + Math.round(g.quantile[0] * 100) + "\u2013" +
        Math.round(g.quantile[1] * 100) + "% of active tokens (activation " + fmt(g.range[0]) + "\u2013" + fmt(g.range[1]) + ")" }));
      var d = el("div", { cls: "samples" });
      g.items.forEach(function (c) { d.appendChild(contextLine(c, mx, "sample")); });
      box.appendChild(d);
    });
    show(box);
  }
})();
