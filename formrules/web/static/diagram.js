// The admin's form page: draw each tree's Mermaid source (in a hidden <pre>) as SVG.
//
// The page's CSP allows a <style> element only with this response's nonce and no style
// attributes at all. Mermaid writes a <style> into every SVG and sets some style
// attributes, so while it draws: each <style> it creates gets the nonce, and a style
// attribute it sets becomes a CSSOM write (el.style.cssText), which CSP does not govern.
// The finished SVG is moved into the page as nodes, not re-parsed from text.
(function () {
  "use strict";
  var root = document.getElementById("diagrams");
  if (!root || !window.mermaid) return;
  var nonce = root.getAttribute("data-style-nonce");
  var createNS = Document.prototype.createElementNS;
  var create = Document.prototype.createElement;
  var setAttribute = Element.prototype.setAttribute;
  function stamp(el, name) {
    if (String(name).toLowerCase() === "style") el.nonce = nonce;
    return el;
  }
  Document.prototype.createElementNS = function (ns, name) {
    return stamp(createNS.apply(this, arguments), name);
  };
  Document.prototype.createElement = function (name) {
    return stamp(create.apply(this, arguments), name);
  };
  Element.prototype.setAttribute = function (name, value) {
    if (String(name).toLowerCase() === "style" && this.style) {
      this.style.cssText = value;
      return;
    }
    return setAttribute.apply(this, arguments);
  };

  // SVG text from mermaid.render -> this page. The text is never parsed with its styles
  // in it: each style="…" becomes data-css="…" first (applied after as CSSOM) and each
  // <style> element's text is taken out (put back in a <style> carrying the nonce).
  var STYLE_ELEMENT = /<style[^>]*>([\s\S]*?)<\/style>/g;
  var STYLE_ATTRIBUTE = /\sstyle="([^"]*)"/g;
  function place(target, svgText) {
    var sheets = [];
    var text = svgText.replace(STYLE_ELEMENT, function (all, css) {
      sheets.push(css);
      return "";
    }).replace(STYLE_ATTRIBUTE, ' data-css="$1"');
    target.innerHTML = text;
    target.querySelectorAll("[data-css]").forEach(function (el) {
      el.style.cssText = el.getAttribute("data-css");
      el.removeAttribute("data-css");
    });
    var svg = target.querySelector("svg");
    sheets.forEach(function (css) {
      var style = document.createElementNS("http://www.w3.org/2000/svg", "style");
      style.textContent = css;
      svg.insertBefore(style, svg.firstChild);
    });
    svg.setAttribute("aria-label", target.getAttribute("data-label") || "Diagram");
  }

  window.mermaid.initialize({
    // "loose" skips Mermaid's last pass, a DOMPurify parse of the whole SVG, styles and all,
    // which the browser reports as CSP violations. Nothing unsafe is let in by it: the
    // source is written by the server with every label character escaped
    // (formrules.language.diagram), labels are drawn as SVG text, not HTML, and the
    // page's CSP runs no script but the app's files.
    startOnLoad: false, securityLevel: "loose", theme: "neutral",
    flowchart: {htmlLabels: false, useMaxWidth: true}
  });
  var sources = root.querySelectorAll("pre.mermaid-source");
  var chain = Promise.resolve();
  sources.forEach(function (pre, i) {
    var target = pre.previousElementSibling;
    chain = chain.then(function () {
      return window.mermaid.render("tree-svg-" + (i + 1), pre.textContent).then(
        function (result) {
          place(target, result.svg);
          target.setAttribute("data-rendered", "true");
        },
        function (error) {
          target.textContent = "The diagram could not be drawn: see the outline below.";
          target.setAttribute("data-rendered", "error");
          if (window.console) window.console.warn(error);
        });
    });
  });
  chain.then(function () { root.setAttribute("data-rendered", "true"); });
})();
