// Progressive enhancement of the waiting page. Without JavaScript a meta refresh (in
// <noscript>) reloads the page; with it, this polls the status JSON (ETag, so an
// unchanged status costs a 304), moves the progress bars in place, and when a status
// changes swaps in the server-rendered part: the same markup either way, no reload.
// Live events (server-sent, `data-events-url`) about this record make it poll at once
// instead of at the next tick; polling stays, as the fallback when the stream fails.
(function () {
  "use strict";
  var root = document.getElementById("status");
  if (!root) return;
  var statusUrl = root.dataset.statusUrl, partUrl = root.dataset.partUrl;
  var announce = document.getElementById("announce");
  var etag = null, delay = 1000, failures = 0, timer = null, inFlight = false, source = null;

  function body() { return root.querySelector(".status-body"); }
  function working() { var b = body(); return b && b.dataset.state === "working"; }

  // What the rendered markup shows; when the JSON disagrees, the part is fetched anew.
  function shownKey() {
    var keys = [body().dataset.state];
    root.querySelectorAll("[data-run]").forEach(function (li) { keys.push(li.dataset.key); });
    return keys.join("|");
  }
  function statusKey(s) {
    var keys = [s.state];
    s.runs.concat(s.other_runs).forEach(function (r) {
      keys.push([r.id, r.status, r.label, r.attempt].join(":"));
    });
    return keys.join("|");
  }

  function text(el, value) { if (el && el.textContent !== value) el.textContent = value; }

  function updateBars(s) {
    s.runs.concat(s.other_runs).forEach(function (run) {
      var li = root.querySelector('[data-run="' + run.id + '"]');
      if (!li) return;
      var bar = li.querySelector("progress");
      if (bar) { bar.value = run.progress; bar.textContent = run.progress + "%"; }
      text(li.querySelector("[data-percent]"), run.progress + "%");
      if (run.message) text(li.querySelector("[data-message]"), run.message);
    });
    var overall = root.querySelector("[data-overall]");
    if (overall) overall.value = s.progress;
    text(root.querySelector("[data-overall-percent]"), s.progress + "%");
  }

  function swap() {
    return fetch(partUrl, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new HttpError("part", r.status);
      return r.text();
    }).then(function (html) {
      root.innerHTML = html;
      var summary = root.querySelector(".summary .headline");
      if (announce && summary) {  // tell screen readers, without the decorative icon
        var copy = summary.cloneNode(true);
        copy.querySelectorAll("[aria-hidden]").forEach(function (el) { el.remove(); });
        announce.textContent = copy.textContent.trim();
      }
    });
  }

  // A failed fetch (either one) is retried with backoff; the status JSON kept from the
  // last 200 is compared again on every 304, so a part that failed to load is fetched
  // anew instead of the page freezing on what it showed before. After MAX_FAILURES
  // answers in a row that were errors, the page reloads whole (the server renders the
  // same state); while the network is down it keeps backing off instead.
  var MAX_FAILURES = 4, last = null;

  function next() {
    if (!working()) {  // finished: the page now shows the result, stop polling
      if (source) source.close();  // and free the server's stream
      return;
    }
    timer = setTimeout(poll, document.hidden ? Math.max(delay, 5000) : delay);
  }

  // A live event about this record: poll now (unless a poll is already under way).
  function listen() {
    var url = root.dataset.eventsUrl, token = root.dataset.token;
    if (!url || !window.EventSource) return;
    source = new EventSource(url);
    function onEvent(e) {
      var data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      if (data.record !== token || inFlight) return;
      clearTimeout(timer);
      poll();
    }
    ["start", "end", "status"].forEach(function (kind) { source.addEventListener(kind, onEvent); });
    // EventSource reconnects by itself (the server's retry:); a refusal closes it, and
    // the polling above carries on either way.
  }

  function HttpError(what, status) { this.message = what + " " + status; }

  function poll() {
    inFlight = true;
    var headers = etag && last ? { "If-None-Match": etag } : {};
    fetch(statusUrl, { headers: headers, credentials: "same-origin", cache: "no-cache" })
      .then(function (r) {
        if (r.status === 304) return last;
        if (!r.ok) throw new HttpError("status", r.status);
        etag = r.headers.get("ETag");
        return r.json();
      }).then(function (s) {
        last = s;
        updateBars(s);
        return statusKey(s) !== shownKey() ? swap() : null;
      }).then(function () {
        inFlight = false; failures = 0; delay = 1000; next();
      }).catch(function (error) {
        inFlight = false;
        failures += 1;
        if (error instanceof HttpError && failures >= MAX_FAILURES) {
          window.location.reload();
          return;
        }
        delay = Math.min(1000 * Math.pow(2, failures - 1), 15000);
        next();
      });
  }

  if (working()) { timer = setTimeout(poll, 500); listen(); }
})();
