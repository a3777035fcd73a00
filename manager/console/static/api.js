// The console's calls: the admin API under /ui/api (cookie auth), the events and shell sockets.

export class ApiError extends Error {
  constructor(status, detail) { super(`${status}: ${detail}`); this.status = status; this.detail = detail; }
}

let onLoggedOut = () => {};
export function whenLoggedOut(fn) { onLoggedOut = fn; }

async function call(url, { method = 'GET', body } = {}) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) { init.headers['content-type'] = 'application/json'; init.body = JSON.stringify(body); }
  const r = await fetch(url, init);
  let data;
  try { data = await r.json(); } catch { data = { detail: r.statusText }; }
  if (r.status === 401) onLoggedOut();
  if (!r.ok) throw new ApiError(r.status, typeof data?.detail === 'string' ? data.detail : JSON.stringify(data));
  return data;
}

export const api = (path, opts) => call('/ui/api/' + path, opts);
export const login = token => call('/ui/login', { method: 'POST', body: { token } });
export const logout = () => call('/ui/logout', { method: 'POST' });
export const whoami = () => call('/ui/whoami');

export function wsUrl(path) {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path;
}

/** Lifecycle events (all, or one node's): resumes after a drop from the last id it saw. */
export function events({ nodeId = null, replay = false, onEvent, onState = () => {} }) {
  let ws = null, lastId = replay ? '0-0' : null, closed = false, ping = null;
  const open = () => {
    const q = new URLSearchParams();
    if (nodeId) q.set('node_id', nodeId);
    if (lastId) q.set('last_event_id', lastId);
    ws = new WebSocket(wsUrl('/ui/ws/events' + (q.size ? '?' + q : '')));
    ws.onopen = () => {
      onState(true);
      ping = setInterval(() => ws.readyState === 1 && ws.send('{"type":"ping"}'), 15000);
    };
    ws.onmessage = e => {
      const m = JSON.parse(e.data);
      if (m.type === 'event') { lastId = m.id; onEvent(m); }
    };
    ws.onclose = () => {
      clearInterval(ping);
      onState(false);
      if (!closed) setTimeout(open, 1000);
    };
  };
  open();
  return { close() { closed = true; ws?.close(); } };
}

/** A node's log: the last `tail` lines, then (follow) live; onLine per line until aborted. */
export async function streamLogs(nodeId, { tail, follow, signal, onLine }) {
  const r = await fetch(`/ui/api/nodes/${encodeURIComponent(nodeId)}/logs?tail=${tail}&follow=${follow ? 1 : 0}`,
    { signal, credentials: 'same-origin' });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch { /* keep the status text */ }
    throw new ApiError(r.status, detail);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const lines = (pending + value).split('\n');
    pending = lines.pop();
    lines.forEach(l => onLine(l.replace(/\r$/, '')));
  }
  if (pending) onLine(pending);
}
