// Progressive enhancement for the portal's pages: every page works without it.
// Served as a static module; the Content-Security-Policy forbids inline script.

function copyButtons() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        button.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(source);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
}

function confirmations() {
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  }
}

// Live updates: follow the signed-in user's event stream (/ui/events/stream, the API's
// GET /events/stream under the page's session) and call `refresh` after each burst of events.
// If the stream cannot be followed, fall back to calling it every `seconds` while the page is shown;
// the browser keeps trying the stream meanwhile (and resumes after the last event it saw).
// A hidden page holds no stream (a browser has ~6 connections per site over HTTP/1.1, and the
// proxy limits connections per address): it closes it and, shown again, resumes after its last event.
function followEvents(url, seconds, refresh, say) {
  let timer = null;
  let pending = null;
  let polling = null;
  let source = null;
  let lastId = null;
  function startPolling() {
    if (polling !== null) return;
    polling = setInterval(() => { if (!document.hidden) refresh(null); }, seconds * 1000);
  }
  function stopPolling() {
    if (polling !== null) clearInterval(polling);
    polling = null;
  }
  function open() {
    const from = new URL(url, window.location.href);
    if (lastId !== null) from.searchParams.set("after", lastId);
    source = new EventSource(from.pathname + from.search);
    source.onopen = () => { stopPolling(); say("live"); };
    source.onerror = () => {
      // CONNECTING: the browser retries by itself; CLOSED (refused, not a stream): it has given up.
      // A session that ended: the next refresh sends the browser to the sign-in page.
      startPolling();
      say(source.readyState === EventSource.CLOSED ? `stream refused; refreshing every ${seconds} s`
                                                   : `stream interrupted; refreshing every ${seconds} s until it is back`);
    };
    source.onmessage = (message) => {
      let event = null;
      try { event = JSON.parse(message.data); } catch { return; }
      if (message.lastEventId) lastId = message.lastEventId;
      pending = event;
      if (timer !== null) return;  // a burst (vm.started, action.start, …) makes one refresh
      timer = setTimeout(() => { timer = null; refresh(pending); }, 250);
    };
  }
  function close() {
    if (source !== null) source.close();
    source = null;
  }
  if (!url || !window.EventSource) { startPolling(); say(`refreshing every ${seconds} s`); return; }
  open();
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) close();
    else if (source === null || source.readyState === EventSource.CLOSED) { close(); open(); }
  });
  window.addEventListener("pagehide", close);
}

function describe(event) {
  return event ? ` after ${event.vm ? event.vm + ": " : ""}${event.type}` : "";
}

// Fleet: the table's rows from the server's HTML fragment (escaped there), refreshed when an event
// arrives, or every few seconds without the stream.
function fleetUpdates() {
  const table = document.querySelector("table[data-poll]");
  if (!table) return;
  const status = document.getElementById("fleet-status");
  const seconds = Number(table.dataset.pollSeconds || "10");
  const url = table.dataset.poll + window.location.search;
  let mode = "";
  async function refresh(event) {
    try {
      const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (answer.status === 401 || answer.redirected) { window.location.assign("/ui/sign-in"); return; }
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      const holder = document.createElement("template");
      holder.innerHTML = (await answer.text()).trim();
      const rows = holder.content.querySelector("tbody");
      if (rows) table.querySelector("tbody").replaceWith(rows);
      if (status) status.textContent = `Updated at ${new Date().toLocaleTimeString()}${describe(event)} (${mode}).`;
    } catch (error) {
      if (status) status.textContent = `Could not refresh (${error.message}); retrying.`;
    }
  }
  followEvents(table.dataset.events, seconds, refresh, (now) => {
    mode = now;
    if (status) status.textContent = now === "live" ? "Live: changes appear as they happen." : `Updates: ${now}.`;
  });
}

// VM: its state and the actions it allows, re-rendered by the server when one of its events arrives.
function vmUpdates() {
  const region = document.querySelector("[data-live-vm]");
  if (!region) return;
  const status = document.getElementById("vm-live-status");
  async function refresh(event) {
    try {
      // the VM's own page (after an action or a form, the address is the form's: /do/start, …)
      const answer = await fetch(region.dataset.page, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (answer.redirected) { window.location.assign("/ui/sign-in"); return; }
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html").querySelector("[data-live-vm]");
      if (fresh) region.replaceChildren(...fresh.childNodes);
      if (status && event) status.textContent = `Updated at ${new Date().toLocaleTimeString()}${describe(event)}.`;
    } catch (error) {
      if (status) status.textContent = `Could not refresh (${error.message}).`;
    }
  }
  followEvents(region.dataset.liveVm, Number(region.dataset.pollSeconds || "10"), refresh, (now) => {
    if (status) status.textContent = now === "live" ? "Live: state changes appear as they happen." : `Updates: ${now}.`;
  });
}

// VM: a small live chart of CPU % and network throughput from the VM's /stats.
function statsChart() {
  const box = document.querySelector("[data-stats]");
  if (!box) return;
  const canvas = box.querySelector("canvas");
  const text = box.querySelector(".stats-text");
  const seconds = Number(box.dataset.statsSeconds || "3");
  const points = [];
  let previous = null;
  const style = getComputedStyle(document.documentElement);
  const colours = { cpu: style.getPropertyValue("--cpu").trim() || "#1565c0",
                    net: style.getPropertyValue("--net").trim() || "#ef6c00" };

  function draw() {
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    ctx.clearRect(0, 0, width, height);
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(0.5, 0.5, width - 1, height - 1);
    const netMax = Math.max(1, ...points.map((p) => p.net));
    for (const [key, max] of [["cpu", 100], ["net", netMax]]) {
      ctx.beginPath();
      ctx.strokeStyle = colours[key];
      ctx.lineWidth = 2;
      points.forEach((p, i) => {
        const x = width - (points.length - 1 - i) * (width / 60);
        const y = height - 4 - (Math.min(p[key], max) / max) * (height - 8);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
      const last = points[points.length - 1];
      if (last) {  // the newest sample as a dot (the first one has no line yet)
        ctx.beginPath();
        ctx.fillStyle = colours[key];
        ctx.arc(width - 4, height - 4 - (Math.min(last[key], max) / max) * (height - 8), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  async function sample() {
    if (document.hidden) return;
    try {
      const answer = await fetch(box.dataset.stats, { credentials: "same-origin" });
      const stats = await answer.json();
      if (!answer.ok) { text.textContent = `No statistics: ${stats.error ? stats.error.detail : answer.status}`; return; }
      const now = performance.now() / 1000;
      const cpuNs = stats.cpu.time_ns;
      const net = stats.net.reduce((sum, n) => sum + (n.rx_bytes || 0) + (n.tx_bytes || 0), 0);
      const vcpus = stats.vcpus.current || 1;
      if (previous && cpuNs !== null && previous.cpuNs !== null) {
        const dt = now - previous.at;
        const cpu = Math.max(0, (cpuNs - previous.cpuNs) / 1e9 / dt / vcpus * 100);
        const kib = Math.max(0, (net - previous.net) / 1024 / dt);
        points.push({ cpu, net: kib });
        if (points.length > 60) points.shift();
        text.textContent = `State ${stats.state || "unknown"}: CPU ${cpu.toFixed(1)} % of ${vcpus} vCPU, network ${kib.toFixed(1)} KiB/s.`;
        draw();
      } else if (cpuNs === null) {
        text.textContent = `State ${stats.state || "unknown"}: no CPU figures while the VM is not running.`;
      } else {
        text.textContent = `State ${stats.state || "unknown"}; measuring…`;
      }
      previous = { at: now, cpuNs, net };
    } catch (error) {
      text.textContent = `No statistics (${error.message}).`;
    }
  }
  draw();
  sample();
  setInterval(sample, seconds * 1000);
}

copyButtons();
confirmations();
fleetUpdates();
vmUpdates();
statsChart();
