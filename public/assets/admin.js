// Levqor operator pages: the little script they have. Everything works
// without it; it asks before a form that changes something is sent, and
// refreshes a page's <main> every few seconds, keeping filters (they are in
// the URL) and scroll, and waiting while someone types or ticks a box.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var main = document.querySelector("main[data-refresh]");
  if (!main || !window.fetch || !window.DOMParser) {
    return;
  }
  var every = 1000 * Number(main.getAttribute("data-refresh"));

  function busy() {
    var active = document.activeElement;
    return document.hidden ||
      (active && active !== document.body && main.contains(active) && active.closest("form")) ||
      main.querySelector("input[type=checkbox]:checked") !== null;
  }

  function refresh() {
    if (busy()) {
      return schedule();
    }
    var here = window.location.href.split("#")[0];
    fetch(here, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok || response.url !== here) {
          window.location.reload(); // logged out, or gone: let the server say
          return null;
        }
        return response.text();
      })
      .then(function (text) {
        if (text === null) {
          return;
        }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.querySelector("main");
        if (fresh && !busy()) {
          main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
          var footer = document.querySelector("footer time");
          var stamp = doc.querySelector("footer time");
          if (footer && stamp) {
            footer.textContent = stamp.textContent;
          }
        }
        schedule();
      })
      .catch(schedule);
  }

  function schedule() {
    window.setTimeout(refresh, every);
  }

  schedule();
})();
