// The run page: follows the run over Server-Sent Events, appending log lines as they come,
// updating steps and status, and following the end of the log until the reader scrolls up.
(function () {
  "use strict";
  const log = document.getElementById("log");
  if (!log) return;
  const runId = log.dataset.run;
  const state = document.getElementById("log-state");
  const followBtn = document.getElementById("follow");
  const BLOCK = 500; // lines per block; blocks off screen are not laid out
  let lineNo = 0, block = null, blockCount = 0, lastStep = undefined, following = true, pending = [];
  let stepNames = {};
  document.querySelectorAll("#steps .step").forEach(function (li) {
    stepNames[li.dataset.index] = li.querySelector(".name").textContent;
  });

  function atBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
  }
  window.addEventListener("scroll", function () {
    const bottom = atBottom();
    if (!bottom && following) { following = false; followBtn.hidden = false; }
    if (bottom && !following) { following = true; followBtn.hidden = true; }
  }, { passive: true });
  followBtn.addEventListener("click", function () {
    following = true; followBtn.hidden = true; window.scrollTo(0, document.documentElement.scrollHeight);
  });

  function newBlock() {
    block = document.createElement("div");
    block.className = "block";
    blockCount = 0;
    log.appendChild(block);
  }

  function flush() {
    if (pending.length === 0) return;
    const items = pending; pending = [];
    let frag = document.createDocumentFragment();
    for (const item of items) {
      if (block === null || blockCount >= BLOCK) {
        if (block && frag.childNodes.length) { block.appendChild(frag); frag = document.createDocumentFragment(); }
        newBlock();
      }
      blockCount += 1;
      if (item.head !== undefined) {
        const h = document.createElement("div");
        h.className = "step-head"; h.id = "L-step-" + item.head;
        h.textContent = "▸ " + (stepNames[item.head] || ("step " + item.head));
        frag.appendChild(h);
        continue;
      }
      lineNo += 1;
      const row = document.createElement("div");
      row.className = "ln-row"; row.id = "L" + lineNo;
      if (item.note) row.classList.add("skiff-note");
      row.innerHTML = '<a class="ln" href="#L' + lineNo + '">' + lineNo + "</a><span>" + item.html + "</span>";
      frag.appendChild(row);
    }
    block.appendChild(frag);
    if (following) window.scrollTo(0, document.documentElement.scrollHeight);
  }

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(function () { scheduled = false; flush(); });
  }

  function setStep(s) {
    const li = document.getElementById("step-" + s.index);
    if (!li) return;
    li.className = "step " + s.status;
    const sym = { succeeded: "✓", failed: "✗", running: "●", pending: "○", cancelled: "⊘", timed_out: "⏱", skipped: "–" };
    li.querySelector(".sym").textContent = sym[s.status] || "?";
    li.querySelector(".took").textContent = s.duration_ms != null ? (s.duration_ms < 1000 ? s.duration_ms + "ms" : (s.duration_ms / 1000).toFixed(1) + "s") : "";
    li.querySelector(".why").textContent = (s.attempt > 1 ? "attempt " + s.attempt + " " : "") + (s.reason || "");
  }

  function setRun(r) {
    const badge = document.getElementById("run-status");
    const sym = { succeeded: "✓", failed: "✗", running: "●", queued: "○", cancelled: "⊘", timed_out: "⏱" };
    badge.className = "badge " + r.status;
    badge.textContent = (sym[r.status] || "?") + " " + r.status;
    const reason = document.getElementById("run-reason");
    reason.textContent = r.reason || "";
    const ended = !(r.status === "queued" || r.status === "running");
    document.getElementById("cancel-form").hidden = ended;
    const c = document.getElementById("cancelling");
    if (c && ended) c.remove();
  }

  const source = new EventSource("/api/runs/" + runId + "/logs/stream?format=html");
  source.addEventListener("log", function (e) {
    const chunk = JSON.parse(e.data);
    if (chunk.step !== lastStep && chunk.step !== null) {
      pending.push({ head: chunk.step });
    }
    lastStep = chunk.step;
    for (const html of chunk.html) {
      pending.push({ html: html, note: html.startsWith("[skiff] ") });
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
    state.textContent = lineNo + " lines · run " + JSON.parse(e.data).status;
    if (location.hash.startsWith("#L")) {
      const target = document.getElementById(location.hash.slice(1));
      if (target) { following = false; target.classList.add("hl"); target.scrollIntoView({ block: "center" }); }
    }
  });
  source.onerror = function () {
    if (source.readyState === EventSource.CONNECTING) state.textContent = "reconnecting…";
  };
})();
