// The Services page: the list follows the server over Server-Sent Events (`/services/live`),
// which sends the list's HTML again whenever a service changes (a deploy, Stop, Start, a run
// ending, or what its engine says). Without JavaScript the page is the same, as of its load.
(function () {
  "use strict";
  const list = document.getElementById("services");
  if (!list || !window.EventSource) return;
  const empty = document.getElementById("no-services");
  const source = new EventSource(list.dataset.liveSrc);
  source.addEventListener("list", function (e) {
    // The server rendered it (escaped by its templates), as it renders the page.
    list.innerHTML = e.data;
    if (empty) empty.hidden = list.children.length > 0;
    list.dataset.updated = String(Date.now());
  });
})();
