// The console page: a one-use ticket from the portal (session + form token), then the console
// WebSocket carrying raw serial bytes to xterm.js, or RFB to noVNC (which asks for the subprotocol
// "binary"; the portal answers with it whenever it is offered).
// Libraries come from static/vendor (scripts/web_assets.py), never from another origin.

const nonce = document.querySelector('meta[name="style-nonce"]')?.content;
// xterm.js adds <style> elements at run time; the page's policy admits them only with its nonce.
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (tag, options) {
  const element = createElement.call(this, tag, options);
  if (nonce && String(tag).toLowerCase() === "style") element.nonce = nonce;
  return element;
};

const box = document.getElementById("console");
const status = document.getElementById("console-status");
let closeCurrent = () => {};

async function ticket() {
  const body = new URLSearchParams({ csrf: box.dataset.csrf, kind: box.dataset.kind });
  const answer = await fetch(box.dataset.ticket, { method: "POST", body, credentials: "same-origin" });
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(data.error ? `${data.error.detail} (${data.error.code})` : `HTTP ${answer.status}`);
  const url = new URL(data.url, window.location.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  return url.toString();
}

async function serial(url) {
  const { Terminal } = await import("/static/vendor/xterm__xterm/lib/xterm.mjs");
  const { FitAddon } = await import("/static/vendor/xterm__addon-fit/lib/addon-fit.mjs");
  box.replaceChildren();
  const term = new Terminal({ convertEol: false, cursorBlink: true, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  // No subprotocol, as the command-line client: bytes come as binary messages either way.
  const socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.onopen = () => { status.textContent = "Connected to the serial console."; term.focus(); };
  socket.onmessage = (event) => term.write(typeof event.data === "string" ? event.data : new Uint8Array(event.data));
  socket.onclose = (event) => { status.textContent = `Disconnected${event.reason ? `: ${event.reason}` : ""}.`; };
  term.onData((data) => { if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data)); });
  window.addEventListener("resize", () => fit.fit());
  return () => socket.close();
}

async function vnc(url) {
  const { default: RFB } = await import("/static/vendor/novnc__novnc/core/rfb.js");
  box.replaceChildren();
  const rfb = new RFB(box, url, { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => { status.textContent = "Connected to the VM's screen."; rfb.focus(); });
  rfb.addEventListener("disconnect", (e) => { status.textContent = e.detail.clean ? "Disconnected." : "Connection lost."; });
  return () => rfb.disconnect();
}

async function connect() {
  closeCurrent();
  status.textContent = "Connecting…";
  try {
    const url = await ticket();
    closeCurrent = await (box.dataset.kind === "vnc" ? vnc(url) : serial(url));
  } catch (error) {
    status.textContent = `Could not open the console: ${error.message}`;
  }
}

document.getElementById("console-reconnect").addEventListener("click", connect);
connect();
