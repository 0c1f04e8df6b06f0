// My tasks, kept current while any task is still active: the list is fetched again
// (ETag, so an unchanged list costs a 304) and swapped in. Without JavaScript the page
// is simply as fresh as its last load. A live event (server-sent, `data-events-url`)
// fetches the list at once; the polling stays as the fallback when the stream fails.
(function () {
  "use strict";
  var root = document.getElementById("tasks");
  if (!root) return;
  var url = root.dataset.partUrl, etag = null, delay = 2000, timer = null, polling = false;
  var source = null;

  function active() { return root.querySelector("[data-active]") !== null; }
  // Never pull the list from under someone about to press a button in it.
  function busy() { return root.contains(document.activeElement) && document.activeElement !== root; }

  function later(ms) { clearTimeout(timer); timer = setTimeout(poll, ms); }

  function poll() {
    if (busy()) { later(delay); return; }
    polling = true;
    var headers = etag ? { "If-None-Match": etag } : {};
    fetch(url, { headers: headers, credentials: "same-origin", cache: "no-cache" })
      .then(function (r) {
        if (r.status === 304) return null;
        if (!r.ok) throw new Error("tasks " + r.status);
        var tag = r.headers.get("ETag");
        return r.text().then(function (html) { return { tag: tag, html: html }; });
      }).then(function (fresh) {
        if (fresh && !busy()) { root.innerHTML = fresh.html; etag = fresh.tag; }
        delay = 2000; polling = false;
        if (active()) later(document.hidden ? 10000 : delay);
        else if (source) { source.close(); source = null; }  // nothing left to follow
      }).catch(function () {
        polling = false;
        delay = Math.min(delay * 2, 30000);
        later(delay);
      });
  }

  function listen() {
    var events = root.dataset.eventsUrl;
    if (!events || !window.EventSource) return;
    source = new EventSource(events);
    ["start", "end", "status"].forEach(function (kind) {
      source.addEventListener(kind, function () { if (!polling) later(0); });
    });
  }

  if (active()) { later(delay); listen(); }
})();
