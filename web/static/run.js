// The run page: follows the run over Server-Sent Events, appending log lines as they come and
// updating steps, status, durations and the tab's title. The page follows the end of the log
// only while the reader is at the end of a live run; a finished run opens at its head (status,
// steps, Rerun), which stays in view (sticky) while the log scrolls; a failed run opens at its
// failed step. Each step's lines are a section under a header that folds; a search box finds
// text in the log (one pass over plain text kept beside the DOM, matches painted with the CSS
// Custom Highlight API, nothing re-rendered); per-line times and wrapping are toggles kept in
// localStorage.
(function () {
  "use strict";
  const log = document.getElementById("log");
  if (!log) return;
  const runId = log.dataset.run;
  const state = document.getElementById("log-state");
  const followBtn = document.getElementById("follow");
  const head = document.getElementById("run-head");
  const BLOCK = 500; // lines per block; blocks off screen are not laid out
  const FOLD_LINES = 500; // a finished log longer than this opens with succeeded steps folded
  const SYM = { succeeded: "✓", failed: "✗", running: "●", queued: "○", pending: "○", cancelled: "⊘", timed_out: "⏱", skipped: "–" };
  let live = log.dataset.active === "true";
  let lineNo = 0, block = null, blockCount = 0, lastStep = undefined, pending = [];
  let body = null, secCount = 0;
  const openedLive = live;
  const lows = []; // each line's text, lower case, for the search
  const stepLi = {};
  document.querySelectorAll("#steps .step").forEach(function (li) { stepLi[li.dataset.index] = li; });

  // Anchors (#L123, a step) land below the sticky head (and the log's bar, sticky on a wide
  // screen), whatever their height.
  const bar = document.querySelector(".log-bar");
  function measureHead() {
    if (!head) return;
    const h = head.offsetHeight, root = document.documentElement.style;
    root.setProperty("--head", h + "px");
    root.setProperty("--sticky", (h + (getComputedStyle(bar).position === "sticky" ? bar.offsetHeight : 0) + 8) + "px");
  }
  measureHead();
  if (head && window.ResizeObserver) { const ro = new ResizeObserver(measureHead); ro.observe(head); ro.observe(bar); }

  function atBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
  }
  let following = live && atBottom();
  function showFollow() {
    // Offered while there is more log below than the screen shows.
    followBtn.textContent = live ? "Follow the end" : "Jump to the end";
    followBtn.hidden = following || atBottom();
  }
  window.addEventListener("scroll", function () {
    following = live && atBottom();
    showFollow();
  }, { passive: true });
  followBtn.addEventListener("click", function () {
    following = live;
    window.scrollTo(0, document.documentElement.scrollHeight);
    showFollow();
  });

  function newBlock() {
    if (body === null) newSection(null);
    block = document.createElement("div");
    block.className = "block";
    blockCount = 0;
    body.appendChild(block);
  }

  // A step's section: a header button (name, status, duration) that folds its lines.
  function newSection(step) {
    block = null;
    const sec = document.createElement("section");
    sec.className = "sec";
    body = document.createElement("div");
    body.className = "sec-body";
    body.id = "B" + (++secCount);
    if (step !== null) {
      const li = stepLi[step];
      const b = document.createElement("button");
      b.type = "button";
      b.className = "step-head";
      b.setAttribute("aria-expanded", "true");
      b.setAttribute("aria-controls", body.id);
      if (!document.getElementById("L-step-" + step)) b.id = "L-step-" + step;
      b.innerHTML = '<span class="caret" aria-hidden="true">▾</span> <span class="sn"></span> <span class="ss"></span> <span class="took"></span>';
      b.querySelector(".sn").textContent = li ? li.querySelector(".name").textContent : "step " + step;
      sec.dataset.step = step;
      sec.appendChild(b);
      paintHead(sec);
    }
    sec.appendChild(body);
    log.appendChild(sec);
  }

  // A section's header shows its step's status and duration, as the list of steps does.
  function paintHead(sec) {
    const li = stepLi[sec.dataset.step], b = sec.firstChild;
    if (!li) return;
    const st = li.className.replace("step ", "");
    sec.className = "sec " + st;
    b.querySelector(".ss").textContent = st.replace("_", " ");
    const t = li.querySelector(".took"), d = b.querySelector(".took");
    d.className = "took" + (t.dataset.start ? " dur" : "");
    d.dataset.start = t.dataset.start || "";
    d.dataset.end = t.dataset.end || "";
    d.textContent = t.textContent;
  }

  function fold(sec, open) {
    const b = sec.querySelector(".step-head");
    if (!b) return;
    b.setAttribute("aria-expanded", String(open));
    b.firstChild.textContent = open ? "▾" : "▸";
    sec.lastChild.hidden = !open;
  }
  log.addEventListener("click", function (e) {
    const b = e.target.closest(".step-head");
    if (b) fold(b.parentNode, b.getAttribute("aria-expanded") !== "true");
  });

  const ENT = { "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'" };
  function plain(html) {
    return html.replace(/<[^>]*>/g, "").replace(/&(amp|lt|gt|quot|#39);/g, function (m) { return ENT[m]; });
  }
  const two = function (n) { return String(n).padStart(2, "0"); };
  function clock(at) {
    const d = new Date(at);
    return isNaN(d) ? "" : two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  // Lines are added as one HTML string per block (the server's lines are escaped HTML already):
  // one parse per 500 lines instead of an element and a parse per line.
  function flush() {
    if (pending.length === 0) return;
    const items = pending; pending = [];
    let html = "";
    // A block off screen is as tall as its lines (`--n`) until it is laid out once.
    function put() {
      if (html) { block.insertAdjacentHTML("beforeend", html); html = ""; block.style.setProperty("--n", blockCount); }
    }
    const from = lineNo;
    for (const item of items) {
      if (item.head !== undefined) { put(); newSection(item.head); continue; }
      if (block === null || blockCount >= BLOCK) { put(); newBlock(); }
      blockCount += 1;
      lineNo += 1;
      html += '<div class="ln-row' + (item.note ? " skiff-note" : "") + '" id="L' + lineNo +
        '" data-t="' + item.t + '"><a class="ln" href="#L' + lineNo + '">' + lineNo + "</a><span>" + item.html + "</span></div>";
      lows.push(item.html.indexOf("<") < 0 && item.html.indexOf("&") < 0 ? item.html.toLowerCase() : plain(item.html).toLowerCase());
    }
    put();
    if (query) { scan(from); count(); }
    if (following) window.scrollTo(0, document.documentElement.scrollHeight);
    showFollow();
  }

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(function () { scheduled = false; flush(); });
  }

  function setDur(el, start, end) {
    if (!el) return;
    el.dataset.start = start || "";
    el.dataset.end = end || "";
    if (window.skiff) window.skiff.duration(el, Date.now());
  }

  function setStep(s) {
    const li = document.getElementById("step-" + s.index);
    if (!li) return;
    li.className = "step " + s.status;
    const sym = li.querySelector(".sym");
    sym.textContent = SYM[s.status] || "?";
    sym.title = s.status;
    li.querySelector(".st").textContent = s.status.replace("_", " ");
    setDur(li.querySelector(".took"), s.started_at, s.finished_at);
    log.querySelectorAll('.sec[data-step="' + s.index + '"]').forEach(paintHead);
    li.querySelector(".why").textContent = (s.attempt > 1 ? "attempt " + s.attempt + " " : "") + (s.reason || "");
  }

  const baseTitle = head ? head.dataset.title : "";
  function setRun(r) {
    const badge = document.getElementById("run-status");
    const word = r.status.replace("_", " ");
    badge.className = "badge " + r.status;
    badge.querySelector(".sym").textContent = SYM[r.status] || "?";
    badge.querySelector(".word").textContent = word;
    document.title = (SYM[r.status] || "?") + " " + baseTitle + " " + word + " · skiff";
    document.getElementById("run-reason").textContent = r.reason || "";
    setDur(document.getElementById("run-took"), r.started_at, r.finished_at);
    document.getElementById("run-time").firstChild.textContent = r.started_at ? "ran " : "not started ";
    const wait = document.getElementById("run-wait");
    if (wait) {
      wait.dataset.end = r.started_at || (r.status === "queued" ? "" : (r.finished_at || ""));
      if (window.skiff) window.skiff.duration(wait, Date.now());
      document.getElementById("run-wait-label").textContent = r.status === "queued" ? "waiting" : "waited";
    }
    const ended = !(r.status === "queued" || r.status === "running");
    document.getElementById("cancel-form").hidden = ended;
    if (ended) endNotice(r, word);
    const c = document.getElementById("cancelling");
    if (c && ended) c.remove();
    if (ended) { live = false; following = false; showFollow(); }
  }

  // "Notify me when it ends": a live run, in a browser that can show notifications, tells the
  // reader (asked once for permission) when it ends, if they have looked away from its tab.
  const notifyBtn = document.getElementById("notify");
  let notify = false;
  if (notifyBtn && live && "Notification" in window && Notification.permission !== "denied") {
    notifyBtn.hidden = false;
    notifyBtn.addEventListener("click", function () {
      function set(on) {
        notify = on;
        notifyBtn.setAttribute("aria-pressed", String(on));
        notifyBtn.textContent = on ? "Will notify you" : "Notify me when it ends";
      }
      if (notify) { set(false); return; }
      if (Notification.permission === "granted") { set(true); return; }
      Notification.requestPermission().then(function (p) {
        set(p === "granted");
        if (p === "denied") notifyBtn.hidden = true;
      });
    });
  }
  function endNotice(r, word) {
    if (notifyBtn) notifyBtn.hidden = true;
    if (!notify) return;
    notify = false;
    if (!document.hidden) return;
    const n = new Notification((SYM[r.status] || "") + " " + baseTitle + " " + word, {
      body: r.reason || "", tag: "skiff-run-" + runId, icon: "/static/icon-192.png"
    });
    n.onclick = function () { window.focus(); n.close(); };
  }

  const source = new EventSource("/api/runs/" + runId + "/logs/stream?format=html");
  // For the benchmark (`cargo bench --bench serve -- ui`): when the page first handled an
  // event, and when the whole log was in the DOM.
  let marked = false;
  function firstEvent() {
    if (!marked && window.performance && performance.mark) { marked = true; performance.mark("skiff-first-event"); }
  }
  ["log", "step", "run"].forEach(function (name) { source.addEventListener(name, firstEvent); });
  source.addEventListener("log", function (e) {
    const chunk = JSON.parse(e.data);
    if (chunk.step !== lastStep && (chunk.step !== null || lastStep !== undefined)) {
      pending.push({ head: chunk.step });
    }
    lastStep = chunk.step;
    const t = clock(chunk.at);
    for (const html of chunk.html) {
      pending.push({ html: html, t: t, note: chunk.stream === "skiff" || html.startsWith("[skiff] ") });
    }
    state.textContent = lineNo + pending.length + " lines";
    schedule();
  });
  source.addEventListener("step", function (e) { setStep(JSON.parse(e.data)); });
  source.addEventListener("run", function (e) {
    const r = JSON.parse(e.data);
    setRun(r);
    if (r.status === "queued") state.textContent = "waiting for a worker…";
  });
  source.addEventListener("end", function (e) {
    source.close();
    flush();
    firstEvent();
    if (window.performance && performance.mark) performance.mark("skiff-log-end");
    const status = JSON.parse(e.data).status;
    state.textContent = lineNo + " lines · run " + status.replace("_", " ");
    const target = location.hash.startsWith("#L") ? document.getElementById(location.hash.slice(1)) : null;
    // A finished run of many lines and more than one step opens with its succeeded steps folded.
    if (!openedLive && lineNo > FOLD_LINES && log.querySelectorAll(".sec[data-step]").length > 1) {
      log.querySelectorAll(".sec.succeeded, .sec.skipped").forEach(function (sec) {
        if (!(target && sec.contains(target))) fold(sec, false);
      });
    }
    if (target) {
      following = false; target.classList.add("hl"); target.scrollIntoView({ block: target.classList.contains("step-head") ? "start" : "center" });
    } else if (!openedLive && (status === "failed" || status === "timed_out")) {
      // A failed run opens at its (first) failed step.
      const sec = log.querySelector(".sec.failed, .sec.timed_out");
      if (sec) sec.scrollIntoView({ block: "start" });
    }
    showFollow();
  });

  // ---- Search: one pass over the lines' text per query; Enter / Shift+Enter move.
  const find = document.getElementById("find"), found = document.getElementById("found");
  let query = "", mLine = [], mAt = [], cur = -1, timer = 0;
  const HL = window.CSS && CSS.highlights && window.Highlight;
  function scan(from) {
    for (let i = from; i < lows.length; i++) {
      const t = lows[i];
      let at = t.indexOf(query);
      while (at >= 0) { mLine.push(i + 1); mAt.push(at); at = t.indexOf(query, at + query.length); }
    }
  }
  function count() {
    const n = mLine.length;
    found.textContent = !query ? "" : !n ? "no match" : cur < 0 ? n + (n === 1 ? " match" : " matches") : (cur + 1) + " of " + n;
  }
  function range(i) {
    const row = document.getElementById("L" + mLine[i]);
    if (!row) return null;
    const w = document.createTreeWalker(row.lastChild, NodeFilter.SHOW_TEXT);
    let start = mAt[i], end = start + query.length, r = document.createRange(), n, s = false;
    while ((n = w.nextNode())) {
      const len = n.length;
      if (!s && start <= len) { r.setStart(n, start); s = true; }
      if (s && end <= len) { r.setEnd(n, end); return r; }
      start -= len; end -= len;
    }
    return null;
  }
  function paint() {
    if (!HL) return;
    CSS.highlights.delete("find"); CSS.highlights.delete("find-cur");
    if (cur < 0) return;
    // Matches near the current one only: a common word in 100,000 lines stays cheap.
    const all = new Highlight();
    for (let i = Math.max(0, cur - 200); i < Math.min(mLine.length, cur + 200); i++) {
      const r = range(i);
      if (r) all.add(r);
    }
    CSS.highlights.set("find", all);
    const r = range(cur);
    if (r) CSS.highlights.set("find-cur", new Highlight(r));
  }
  function go(i) {
    const old = log.querySelector(".ln-row.found");
    if (old) old.classList.remove("found");
    cur = mLine.length ? (i + mLine.length) % mLine.length : -1;
    count();
    if (cur < 0) return paint();
    const row = document.getElementById("L" + mLine[cur]);
    const sec = row.closest(".sec");
    if (sec.lastChild.hidden) fold(sec, true);
    row.classList.add("found");
    following = false;
    row.scrollIntoView({ block: "center" });
    paint();
  }
  function search() {
    query = find.value.toLowerCase();
    mLine = []; mAt = []; cur = -1;
    if (query) scan(0);
    go(0);
  }
  find.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(search, 150); });
  find.addEventListener("keydown", function (e) {
    if (e.key !== "Enter") return;
    e.preventDefault();
    if (find.value.toLowerCase() !== query) { clearTimeout(timer); search(); } else go(cur + (e.shiftKey ? -1 : 1));
  });
  // "/" anywhere but a field goes to the search box, as on GitHub.
  document.addEventListener("keydown", function (e) {
    if (e.key === "/" && !e.ctrlKey && !e.metaKey && !e.altKey && !/^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) {
      e.preventDefault(); find.focus(); find.select();
    }
  });
  document.getElementById("find-prev").addEventListener("click", function () { go(cur - 1); });
  document.getElementById("find-next").addEventListener("click", function () { go(cur + 1); });

  // ---- Toggles kept in localStorage: per-line times (off), wrapping (on).
  // `cls` is set while the toggle is on, `!cls` while it is off.
  function toggle(id, key, cls, on) {
    const off = cls[0] === "!";
    if (off) cls = cls.slice(1);
    const b = document.getElementById(id);
    let v = on;
    try { const s = localStorage.getItem(key); if (s !== null) v = s === "1"; } catch (_) { /* storage off */ }
    function set(x) {
      v = x;
      b.setAttribute("aria-pressed", String(v));
      log.classList.toggle(cls, off ? !v : v);
    }
    set(v);
    b.addEventListener("click", function () {
      set(!v);
      try { localStorage.setItem(key, v ? "1" : "0"); } catch (_) { /* storage off */ }
    });
  }
  toggle("times", "skiff.log.times", "times", false);
  toggle("wrap", "skiff.log.wrap", "!nowrap", true);
  document.getElementById("log-tools").hidden = false;
  source.onerror = function () {
    if (source.readyState === EventSource.CONNECTING) state.textContent = "reconnecting…";
  };
})();
