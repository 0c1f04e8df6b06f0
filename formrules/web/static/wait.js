// Progressive enhancement of the waiting page: poll the status JSON (ETag, so an
// unchanged status costs a 304) and update the same markup in place. Without
// JavaScript the page's meta refresh does the same job.
(function () {
  var root = document.getElementById("status");
  if (!root || root.dataset.done === "true") return;
  var meta = document.querySelector('meta[http-equiv="refresh"]');
  if (meta) meta.parentNode.removeChild(meta);  // we take over from the meta refresh
  var url = root.dataset.statusUrl, etag = null, delay = 1000;

  function text(el, value) { if (el && el.textContent !== value) el.textContent = value; }

  function render(s) {
    s.runs.forEach(function (run) {
      var li = root.querySelector('[data-run="' + run.id + '"]');
      if (!li) return;
      li.className = "run run-" + run.status;
      text(li.querySelector(".status-label"), run.status);
      var bar = li.querySelector("progress");
      bar.value = run.progress;
      bar.textContent = run.progress + "%";
      bar.setAttribute("aria-label", run.title + ": " + run.progress + "%");
      text(li.querySelector(".run-message"), run.message || "");
    });
    if (s.done) {
      // The finished page carries messages, files and links: load it once, for real.
      window.location.reload();
    }
  }

  function poll() {
    var headers = etag ? { "If-None-Match": etag } : {};
    fetch(url, { headers: headers, credentials: "same-origin" }).then(function (r) {
      if (r.status === 304) return null;
      if (!r.ok) throw new Error("status " + r.status);
      etag = r.headers.get("ETag");
      return r.json();
    }).then(function (s) {
      if (s) render(s);
      delay = 1000;
      if (!s || !s.done) setTimeout(poll, delay);
    }).catch(function () {
      delay = Math.min(delay * 2, 15000);  // back off while the server is unreachable
      setTimeout(poll, delay);
    });
  }
  setTimeout(poll, 500);
})();
