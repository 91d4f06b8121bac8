/* sae-kernels comparison page: two SAEs' decoder geometry (data/compare-*.js), plain JavaScript. */
(function () {
  "use strict";
  var docs = {};
  var el = function (tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k]; else if (k === "cls") e.className = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (kids || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  };
  var svgEl = function (tag, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  };
  window.SAEDash = { data: function (name, doc) { docs[name] = doc; } };
  function hist(h, key, color, W, H) {
    // latents dead on the corpus keep their initial directions: show the live ones' matches when known
    var live = h[key + "_live"] !== undefined;
    var svg = svgEl("svg", { width: W, height: H + 20, viewBox: "0 0 " + W + " " + (H + 20), id: "hist-" + key,
                             "data-latents": live ? "live" : "all" });
    var v = h[key + (live ? "_live" : "")], mx = Math.max.apply(null, v.concat([1])), bw = (W - 46) / v.length;
    v.forEach(function (c, i) {
      var hh = c / mx * (H - 8);
      var r = svgEl("rect", { x: 30 + i * bw, y: H - hh, width: Math.max(bw - 1, 1), height: hh, fill: color });
      var t = svgEl("title", {}); t.textContent = h.edges[i] + " .. " + h.edges[i + 1] + ": " + c; r.appendChild(t);
      svg.appendChild(r);
    });
    h.edges.forEach(function (e, i) {
      if (Math.abs(e * 5 - Math.round(e * 5)) < 1e-6) {
        var tx = svgEl("text", { x: 30 + i * bw, y: H + 14, "text-anchor": "middle" }); tx.textContent = e.toFixed(1); svg.appendChild(tx);
      }
    });
    var ty = svgEl("text", { x: 2, y: 10 }); ty.textContent = String(mx); svg.appendChild(ty);
    return svg;
  }
  function latentLink(which, id, d) {
    var href = d.links[which];
    var name = d[which].name + " #" + id;
    var a = href ? el("a", { href: href + "#latent=" + id, text: name }) :
      el("span", { text: name, cls: "nolink", title: d[which].name + " has no dashboard" +
        (d.analyse_hint ? ": " + d.analyse_hint[which] : "") });
    var toks = d.tokens && d.tokens[which] && d.tokens[which][String(id)];
    if (!toks || !toks.length) return a;
    return el("span", { cls: "lref", "data-latent": String(id) }, [a, el("span", { cls: "lab",
      text: " " + toks.map(function (t) { return JSON.stringify(t); }).join(" ") })]);
  }
  function map(d) {
    var W = 680, H = 520, c = el("canvas", { width: W, height: H, cls: "map", id: "map" });
    var dead = { a: {}, b: {} };
    (d.map.dead_a || []).forEach(function (i) { dead.a[i] = 1; });
    (d.map.dead_b || []).forEach(function (i) { dead.b[i] = 1; });
    var all = d.map.a.filter(function (p, i) { return !dead.a[i]; }).concat(d.map.b.filter(function (p, i) { return !dead.b[i]; }));
    if (!all.length) all = d.map.a.concat(d.map.b);
    // a loop, not Math.min.apply: 32K + 128K points exceed the arguments a call may take
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    all.forEach(function (p) { x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]); y0 = Math.min(y0, p[1]); y1 = Math.max(y1, p[1]); });
    var X = function (v) { return 10 + (v - x0) / (x1 - x0 || 1) * (W - 20); };
    var Y = function (v) { return H - 10 - (v - y0) / (y1 - y0 || 1) * (H - 20); };
    var g = c.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
    [[true, "a"], [true, "b"], [false, "b"], [false, "a"]].forEach(function (s) {
      var w = s[1], isDead = s[0];
      g.fillStyle = isDead ? "rgba(170,176,184,0.3)" : (w === "a" ? "rgba(47,111,214,0.6)" : "rgba(232,115,28,0.45)");
      d.map[w].forEach(function (p, i) {
        if (!!dead[w][i] !== isDead) return;
        g.beginPath(); g.arc(X(p[0]), Y(p[1]), w === "a" ? 1.6 : 1.3, 0, 6.2832); g.fill();
      });
    });
    var info = el("div", { cls: "legend", id: "map-info", text: "blue: " + d.a.name + " (" + d.map.a.length + "), orange: " +
      d.b.name + " (" + d.map.b.length + ")" + (d.map.dead_a ? ", grey: dead on the corpus" : "") +
      "; click a point to open its latent" });
    c.addEventListener("click", function (ev) {
      var r = c.getBoundingClientRect(), mx = (ev.clientX - r.left) * W / r.width, my = (ev.clientY - r.top) * H / r.height;
      var best = null, bd = 64;
      ["a", "b"].forEach(function (w) {
        d.map[w].forEach(function (p, i) {
          var dd = Math.pow(X(p[0]) - mx, 2) + Math.pow(Y(p[1]) - my, 2);
          if (dd < bd) { bd = dd; best = [w, i]; }
        });
      });
      if (best) { info.innerHTML = ""; info.appendChild(latentLink(best[0], best[1], d)); }
    });
    return el("div", {}, [c, info]);
  }
  window.SAECompare = { start: function (name) {
    var d = docs[name];
    var head = document.getElementById("head"), main = document.getElementById("cmp");
    if (!d) { head.textContent = "data/" + name + ".js did not load"; return; }
    head.appendChild(el("h1", { text: d.a.name + " vs " + d.b.name }));
    var par = d[d.parent], chi = d[d.parent === "a" ? "b" : "a"];
    var med = function (key) {
      var m = d.median_best_cos || {}, v = m[key + "_live"] != null ? m[key + "_live"] : m[key];
      return v != null ? " (median " + v.toFixed(3) + ")" : "";
    };
    head.appendChild(el("div", { cls: "meta", text: d.a.name + ": " + d.a.d_sae + " latents, " + d.b.name + ": " + d.b.d_sae +
      " latents \u00b7 families: a latent of " + par.name + " and the latents of " + chi.name + " at cosine \u2265 " + d.threshold +
      (d.corpus ? " \u00b7 co-firing on " + d.corpus.tokens + " tokens of " + d.corpus.dataset : "") }));
    var nav = el("nav", { cls: "members" });
    if (!d.links || d.links.a) nav.appendChild(el("a", { href: "index.html", text: "\u2190 " + d.a.name + " dashboard" }));
    if (d.links && d.links.b) nav.appendChild(el("a", { href: d.links.b, text: d.b.name + " dashboard" }));
    head.appendChild(nav);
    ["a", "b"].forEach(function (w) {
      var notes = [];
      if (d.links && !d.links[w]) notes.push("has no dashboard, so its latents are not linked");
      if (d.analysed && !d.analysed[w]) notes.push("has no analysis, so its latents show no top tokens");
      if (notes.length) head.appendChild(el("div", { cls: "warn", id: "hint-" + w, text: d[w].name + " " + notes.join(" and ") +
        ": run " + (d.analyse_hint ? d.analyse_hint[w] : "python -m trainer.analyze on it") + ", then this comparison again" }));
    });
    var s1 = el("section", {}, [el("h2", { text: "Best decoder-cosine match" }),
      el("div", { cls: "legend", text: "each " + (d.hist.a_to_b_live ? "live " : "") + "latent of " + d.a.name +
        " \u2192 its most similar latent of " + d.b.name + med("a_to_b") }),
      hist(d.hist, "a_to_b", "#2f6fd6", 440, 110),
      el("div", { cls: "legend", text: "each " + (d.hist.b_to_a_live ? "live " : "") + "latent of " + d.b.name +
        " \u2192 its most similar latent of " + d.a.name + med("b_to_a") }),
      hist(d.hist, "b_to_a", "#e8731c", 440, 110)]);
    var s2 = el("section", {}, [el("h2", { text: "Decoder directions (" + d.map.method.toUpperCase() + ")" }), map(d)]);
    var t = el("table", { id: "families" });
    t.appendChild(el("tr", {}, [el("th", { text: "parent (" + par.name + ")" }), el("th", { text: "fires" }),
      el("th", { text: "with a child" }), el("th", { cls: "toks", text: "children in " + chi.name + " (top tokens): cosine, P(child | parent), P(parent | child)" })]));
    var pw = d.parent, cw = pw === "a" ? "b" : "a";
    d.families.slice(0, 500).forEach(function (f) {
      var kids = el("td", { cls: "toks" });
      f.children.forEach(function (k) {
        kids.appendChild(latentLink(cw, k[0], d));
        kids.appendChild(document.createTextNode(" (" + k[1].toFixed(2) + (k[3] != null ? ", " + k[3].toFixed(2) : "") +
          (k[4] != null ? ", " + k[4].toFixed(2) : "") + ")  "));
      });
      if (f.capped) kids.appendChild(el("span", { cls: "badge", text: "capped" }));
      t.appendChild(el("tr", { cls: "family", "data-feature-id": String(f.parent) }, [el("td", {}, [latentLink(pw, f.parent, d)]),
        el("td", { text: f.parent_count == null ? "" : String(f.parent_count) }),
        el("td", { text: f.any_child_rate == null ? "" : (f.any_child_rate * 100).toFixed(1) + "%" }), kids]));
    });
    var s3 = el("section", { style: "grid-column: 1 / span 2" }, [el("h2", { text: "Feature-splitting families (" + d.families.length +
      " parents; the largest 500 shown)" }),
      el("div", { cls: "legend", text: "among " + (d.families_of || "all latents") +
        (d.same_index_best > 0.01 * Math.min(d.a.d_sae, d.b.d_sae) ? "; note: " + d.same_index_best + " latents of " + d.a.name +
          " have their best match at the same index (the SAEs share an initialisation)" : "") }),
      el("div", { cls: "tablewrap" }, [t])]);
    main.appendChild(s1); main.appendChild(s2); main.appendChild(s3);
  } };
})();
