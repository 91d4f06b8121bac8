/* sae-kernels probe page: which latents fire on which tokens of a text (data inline), plain JavaScript. */
(function () {
  "use strict";
  var el = function (tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k]; else if (k === "cls") e.className = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (kids || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  };
  var fmt = function (x) { var a = Math.abs(x); return a === 0 ? "0" : (a >= 1e4 || a < 1e-3 ? x.toExponential(2) : x.toPrecision(3)); };
  var shown = function (t) { return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); };
  var SHOWN = 5;

  function latentRef(s, id) {
    var lab = (s.labels || {})[String(id)];
    var name = "#" + id;
    var a = s.dashboard ? el("a", { href: s.dashboard + "#latent=" + id, cls: "latent", "data-latent": String(id), text: name })
                        : el("span", { cls: "latent", "data-latent": String(id), text: name });
    var wrap = el("span", { cls: "lref" }, [a]);
    if (lab && lab.length) wrap.appendChild(el("span", { cls: "lab", text: " " + lab.map(function (t) { return JSON.stringify(t); }).join(" ") }));
    return wrap;
  }

  function section(d, s) {
    var box = el("section", { cls: "probe-sae", "data-sae": s.name });
    box.appendChild(el("h2", { text: s.name }));
    box.appendChild(el("div", { cls: "legend", text: s.dashboard ?
      "latent ids link into the SAE's dashboard; click a token for all its latents, a latent's shade button to shade the text by it" :
      "this SAE has no dashboard yet: run python -m trainer.analyze " + s.folder + " for its latents' pages and top tokens" }));
    var strip = el("div", { cls: "ctx probe-text" });
    var spans = [];
    var maxOf = function (id) {
      var m = 0;
      s.codes.forEach(function (row) { row.forEach(function (c) { if (c[0] === id && c[1] > m) m = c[1]; }); });
      return m;
    };
    var status = el("div", { cls: "legend probe-status", text: "" });
    function shade(id) {
      var m = maxOf(id);
      spans.forEach(function (sp, p) {
        var a = 0;
        s.codes[p].forEach(function (c) { if (c[0] === id) a = c[1]; });
        sp.style.backgroundColor = a > 0 && m > 0 ? "rgba(255, 112, 0, " + Math.min(1, a / m).toFixed(3) + ")" : "";
        sp.setAttribute("data-act", String(a));
      });
      status.textContent = "shading: latent #" + id + " (max " + fmt(m) + " on this text)";
      box.setAttribute("data-shaded", String(id));
    }
    var detail = el("div", { cls: "probe-detail" });
    function showToken(p) {
      detail.innerHTML = "";
      detail.appendChild(el("h3", { text: "Token " + p + ": " + JSON.stringify(d.texts[p]) }));
      if (!s.codes[p].length) { detail.appendChild(el("p", { cls: "empty", text: "special token: not encoded" })); return; }
      var t = el("table", {}, [el("tr", {}, [el("th", { cls: "toks", text: "latent" }), el("th", { text: "activation" }), el("th", { text: "" })])]);
      s.codes[p].forEach(function (c) {
        var b = el("button", { text: "shade", cls: "shade" });
        b.addEventListener("click", function () { shade(c[0]); });
        t.appendChild(el("tr", {}, [el("td", { cls: "toks" }, [latentRef(s, c[0])]), el("td", { text: fmt(c[1]) }), el("td", {}, [b])]));
      });
      detail.appendChild(t);
    }
    d.texts.forEach(function (txt, p) {
      var top = s.codes[p].slice(0, SHOWN).map(function (c) { return "#" + c[0] + " " + fmt(c[1]); }).join(", ");
      var sp = el("span", { cls: "tok" + (s.codes[p].length ? "" : " special"), "data-pos": String(p),
        title: JSON.stringify(txt) + (top ? "  " + top : "  (not encoded)") });
      sp.textContent = shown(txt);
      sp.addEventListener("click", function () { showToken(p); });
      spans.push(sp);
      strip.appendChild(sp);
    });
    box.appendChild(strip);
    box.appendChild(status);
    var table = el("table", { cls: "probe-table" });
    table.appendChild(el("tr", {}, [el("th", { text: "pos" }), el("th", { cls: "toks", text: "token" }),
      el("th", { cls: "toks", text: "most active latents (activation)" })]));
    d.texts.forEach(function (txt, p) {
      var cell = el("td", { cls: "toks" });
      if (!s.codes[p].length) cell.appendChild(el("span", { cls: "empty", text: "special token: not encoded" }));
      s.codes[p].slice(0, SHOWN).forEach(function (c) {
        cell.appendChild(latentRef(s, c[0]));
        var b = el("button", { text: fmt(c[1]), cls: "shade", title: "shade the text by latent #" + c[0] });
        b.addEventListener("click", function () { shade(c[0]); });
        cell.appendChild(b);
        cell.appendChild(document.createTextNode("  "));
      });
      table.appendChild(el("tr", { cls: "probe-token", "data-pos": String(p) }, [el("td", { text: String(p) }),
        el("td", { cls: "toks", text: JSON.stringify(txt) }), cell]));
    });
    box.appendChild(detail);
    box.appendChild(el("div", { cls: "tablewrap" }, [table]));
    // open on the latent most active on the text
    var best = null;
    s.codes.forEach(function (row) { row.forEach(function (c) { if (!best || c[1] > best[1]) best = c; }); });
    if (best) shade(best[0]);
    return box;
  }

  window.SAEProbe = { start: function (d) {
    var head = document.getElementById("head"), main = document.getElementById("probe");
    head.appendChild(el("div", { cls: "meta", text: d.model + " \u00b7 " + d.tokens.length + " tokens \u00b7 the " + SHOWN +
      " most active latents of each token (" + d.saes.length + " SAE" + (d.saes.length > 1 ? "s" : "") + ")" }));
    d.saes.forEach(function (s) { main.appendChild(section(d, s)); });
  } };
})();
