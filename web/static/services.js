// The Services page: the list follows the server over Server-Sent Events (`/services/live`),
// which sends the list's HTML again whenever a service changes (a deploy, Stop, Start, a run
// ending, or what its engine says). Only the services whose HTML changed are replaced, so a
// button being pressed on another row stays put. Without JavaScript the page is the same, as of
// its load.
(function () {
  "use strict";
  const list = document.getElementById("services");
  if (!list || !window.EventSource) return;
  const empty = document.getElementById("no-services");
  // What the server last sent for each service (the page's own rows count as sent).
  const sent = new Map();
  Array.from(list.children).forEach(function (li) { sent.set(li.dataset.service, li.outerHTML); });
  const source = new EventSource(list.dataset.liveSrc);
  source.addEventListener("list", function (e) {
    // Rendered (and escaped) by the server's templates, as the page is.
    const next = document.createElement("ul");
    next.innerHTML = e.data;
    const rows = new Map();
    Array.from(list.children).forEach(function (li) { rows.set(li.dataset.service, li); });
    const seen = new Set();
    Array.from(next.children).forEach(function (li, i) {
      const name = li.dataset.service;
      const html = li.outerHTML;
      seen.add(name);
      let row = rows.get(name);
      if (!row || sent.get(name) !== html) {
        if (row) row.replaceWith(li); else list.appendChild(li);
        row = li;
        sent.set(name, html);
      }
      if (list.children[i] !== row) list.insertBefore(row, list.children[i] || null);
    });
    rows.forEach(function (li, name) {
      if (!seen.has(name)) { li.remove(); sent.delete(name); }
    });
    if (empty) empty.hidden = list.children.length > 0;
    list.dataset.updated = String(Date.now());
  });
})();
