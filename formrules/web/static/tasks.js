// My tasks, kept current while any task is still active: the list is fetched again
// (ETag, so an unchanged list costs a 304) and swapped in. Without JavaScript the page
// is simply as fresh as its last load.
(function () {
  "use strict";
  var root = document.getElementById("tasks");
  if (!root) return;
  var url = root.dataset.partUrl, etag = null, delay = 2000;

  function active() { return root.querySelector("[data-active]") !== null; }
  // Never pull the list from under someone about to press a button in it.
  function busy() { return root.contains(document.activeElement) && document.activeElement !== root; }

  function poll() {
    if (busy()) { setTimeout(poll, delay); return; }
    var headers = etag ? { "If-None-Match": etag } : {};
    fetch(url, { headers: headers, credentials: "same-origin", cache: "no-cache" })
      .then(function (r) {
        if (r.status === 304) return null;
        if (!r.ok) throw new Error("tasks " + r.status);
        var tag = r.headers.get("ETag");
        return r.text().then(function (html) { return { tag: tag, html: html }; });
      }).then(function (fresh) {
        if (fresh && !busy()) { root.innerHTML = fresh.html; etag = fresh.tag; }
        delay = 2000;
        if (active()) setTimeout(poll, document.hidden ? 10000 : delay);
      }).catch(function () {
        delay = Math.min(delay * 2, 30000);
        setTimeout(poll, delay);
      });
  }

  if (active()) setTimeout(poll, delay);
})();
