// Every page: times shown relative ("3 min ago") with the absolute time in the viewer's zone on
// hover; durations that tick while something runs; lists of runs that keep themselves current;
// copy buttons. The server renders times as `<time datetime>` and durations as
// `<span class="dur" data-start data-end>`, so every page reads without this file too.
(function () {
  "use strict";

  // As skiff's server writes durations: 850ms, 3.5s, 2m05s, 1h04m.
  function human(ms) {
    ms = Math.max(0, Math.round(ms));
    if (ms < 1000) return ms + "ms";
    if (ms < 60000) return (Math.floor(ms / 100) / 10).toFixed(1) + "s";
    const s = Math.floor(ms / 1000);
    if (ms < 3600000) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
  }

  function relative(ms) {
    const s = Math.round(ms / 1000);
    if (s < 45) return "just now";
    const m = Math.round(s / 60);
    if (m < 60) return m + " min ago";
    const h = Math.round(m / 60);
    if (h < 24) return h + " h ago";
    const d = Math.round(h / 24);
    if (d < 30) return d === 1 ? "yesterday" : d + " days ago";
    return null;
  }

  const absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  function times(root) {
    const now = Date.now();
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      const at = Date.parse(t.getAttribute("datetime"));
      if (isNaN(at)) return;
      const abs = absolute.format(new Date(at));
      t.title = abs;
      // `data-abs`: a time to come (a schedule's next slots), shown as it is, in this zone.
      t.textContent = t.hasAttribute("data-abs") ? abs : relative(now - at) || abs;
    });
  }

  // One duration: from data-start to data-end, or to now while data-end is empty.
  function duration(el, now) {
    const start = Date.parse(el.dataset.start || "");
    if (isNaN(start)) return;
    const end = Date.parse(el.dataset.end || "");
    el.textContent = human((isNaN(end) ? now : end) - start);
  }

  function durations(root) {
    const now = Date.now();
    root.querySelectorAll(".dur").forEach(function (el) { duration(el, now); });
  }

  window.skiff = { human: human, duration: duration, durations: durations, times: times };

  times(document);
  durations(document);
  // Ticking: only what is still going changes each second; times each half minute.
  setInterval(function () {
    const now = Date.now();
    document.querySelectorAll(".dur[data-start]").forEach(function (el) {
      if (el.dataset.start && !el.dataset.end) duration(el, now);
    });
  }, 1000);
  setInterval(function () { times(document); }, 30000);

  // Lists that update themselves: the element with `data-live` is fetched again (the same
  // page) and replaced, every 3 s while a run in it is going, every 15 s otherwise, and only
  // while the tab is visible.
  const live = document.querySelector("[data-live][id]");
  if (live) {
    let last = 0;
    setInterval(function () {
      if (document.hidden) return;
      const busy = live.querySelector(".running, .queued") !== null;
      if (Date.now() - last < (busy ? 3000 : 15000)) return;
      last = Date.now();
      fetch(location.href, { credentials: "same-origin" }).then(function (r) {
        return r.ok ? r.text() : null;
      }).then(function (html) {
        if (html === null) return;
        const fresh = new DOMParser().parseFromString(html, "text/html").getElementById(live.id);
        if (!fresh) return;
        live.replaceChildren.apply(live, Array.from(fresh.childNodes));
        times(live);
        durations(live);
      }).catch(function () {});
    }, 1000);
  }

  // Copy buttons: `data-copy` names the element whose text is copied.
  document.querySelectorAll("button[data-copy]").forEach(function (b) {
    b.addEventListener("click", function () {
      const el = document.getElementById(b.dataset.copy);
      if (!el) return;
      const done = function () { b.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(el.textContent).then(done, function () { select(el); });
      } else {
        select(el);
        try { if (document.execCommand("copy")) done(); } catch (e) { /* selected for the reader */ }
      }
    });
  });

  function select(el) {
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
})();
