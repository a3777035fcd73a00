// One session: its record, egress (policy, recent refusals and secret uses), events, live log,
// workspace tree and a terminal to its /ws/shell.
import { Terminal } from '/ui/vendor/xterm.mjs';
import { h, fill, since, bytes } from './dom.js';
import { api, events, streamLogs, wsUrl } from './api.js';
import { actionButtons } from './sessions.js';

const MAX_LOG_LINES = 5000;
const MAX_EGRESS_ROWS = 50;  // recent refusals and secret uses kept on the page, newest first
let current = null;  // what the open session view holds: sockets, fetches, the terminal

/** The id of the session whose view is open, or null. */
export const openSessionId = () => current?.id ?? null;

export function closeSession() {
  if (!current) return;
  current.events?.close();
  current.logs?.abort();
  current.shell?.close();
  current.term?.dispose();
  current = null;
}

function shown(k, v) {
  if (k.endsWith('_at') && typeof v === 'number') return v > 0 ? `${new Date(v * 1000).toISOString()} (${since(v)} ago)` : '';
  return typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v ?? '');
}

function kv(obj) {
  return h('table', { class: 'kv' }, Object.entries(obj ?? {}).map(([k, v]) =>
    h('tr', {}, h('th', {}, k), h('td', { class: 'wrap' }, shown(k, v)))));
}

export function openSession(el, id, ctx) {
  closeSession();
  const cur = current = { id };
  const recordBox = h('div', { id: 'record' }, h('p', { class: 'muted' }, 'reading\u2026'));
  const actionsBox = h('span');
  const eventsBox = h('div', { class: 'events card', id: 'session-events' });
  const logBox = h('div', { class: 'log', id: 'log' });
  const filesBox = h('pre', { id: 'files' }, '');
  const termBox = h('div', { class: 'term', id: 'terminal' });
  const tail = h('input', { type: 'number', id: 'log-tail', min: 0, max: 10000, value: 200, style: 'width:6em' });
  const follow = h('input', { type: 'checkbox', id: 'log-follow', checked: true });
  const logState = h('span', { class: 'muted', id: 'log-state' });
  const forkCount = h('input', { type: 'number', id: 'fork-count', min: 1, max: 100, value: 1, style: 'width:4em' });
  const snapName = h('input', { type: 'text', id: 'snapshot-name', placeholder: 'snapshot name', style: 'width:12em' });
  const copyResult = h('span', { class: 'muted', id: 'copy-result' });
  // egress: the policy in force, and from this session's events its refusals and secret uses
  // (an event names a secret and a host, never a value: the page cannot show what it never gets)
  const policyBox = h('pre', { id: 'egress-policy' }, 'reading\u2026');
  const deniedBox = h('div', { class: 'events card', id: 'egress-denials' }, h('p', { class: 'muted' }, 'none'));
  const secretsBox = h('div', { class: 'events card', id: 'egress-secrets' }, h('p', { class: 'muted' }, 'none'));
  const loadPolicy = async () => {
    try {
      const d = await api(`nodes/${encodeURIComponent(id)}/egress`);
      if (current === cur) policyBox.textContent = JSON.stringify(d.egress, null, 2);
    } catch (e) { if (current === cur) policyBox.textContent = e.detail ?? e.message; }
  };
  const egressRow = (box, ev) => {
    if (!box.dataset.rows) box.replaceChildren();
    box.dataset.rows = '1';
    box.prepend(h('div', {}, `${new Date(ev.at * 1000).toLocaleTimeString()}  ${ev.detail ?? ''}`));
    while (box.childElementCount > MAX_EGRESS_ROWS) box.lastElementChild.remove();
  };

  // a fork's copies, linked; a snapshot's name and size (GET /admin/snapshots lists them all)
  const copyOf = async (what, body, show) => {
    copyResult.textContent = `${what}\u2026`;
    try {
      show(await api(`nodes/${encodeURIComponent(id)}/${what}`, { method: 'POST', body }));
      ctx.refresh();
    } catch (e) { copyResult.textContent = `${what}: ${e.detail ?? e.message}`; }
  };
  const doFork = () => copyOf('fork', { count: parseInt(forkCount.value, 10) || 1 }, r => fill(copyResult, 'copies: ',
    r.sessions.map(s => [h('a', { class: 'node', href: `#/session/${encodeURIComponent(s)}`, 'data-node': s }, s.slice(0, 12)), ' '])));
  const doSnapshot = () => copyOf('snapshot', { name: snapName.value.trim() },
    r => { copyResult.textContent = `snapshot ${r.name} saved (${bytes(r.bytes)})`; });

  // one read at a time (an inspect samples the engine's stats: about a second), one more if asked meanwhile
  const loadRecord = async () => {
    if (cur.loading) { cur.again = true; return; }
    cur.loading = true;
    try { do { cur.again = false; await readRecord(); } while (cur.again && current === cur); }
    finally { cur.loading = false; }
  };
  const readRecord = async () => {
    try {
      const d = await api(`nodes/${encodeURIComponent(id)}`);
      if (current !== cur) return;
      const rec = d.record ?? {};
      if (cur.shownStatus !== rec.status) {  // buttons stay put while the status does
        cur.shownStatus = rec.status;
        fill(actionsBox, actionButtons(rec, ctx.actions, () => { ctx.refresh(); loadRecord(); }, ctx.flash));
      }
      fill(recordBox, h('div', { class: 'cols' },
        h('div', {}, h('h2', {}, 'Record'), kv(rec)),
        h('div', {}, h('h2', {}, 'Container'), d.container ? kv(d.container) : h('p', { class: 'muted' }, d.error ?? 'no container'),
          d.stats ? [h('h2', {}, 'Usage'), kv(d.stats)] : null)));
    } catch (e) {
      if (current === cur) fill(recordBox, h('p', { class: 'error' }, e.detail ?? e.message));
    }
  };

  const startLogs = () => {
    cur.logs?.abort();
    const ctl = cur.logs = new AbortController();
    logBox.replaceChildren();
    logState.textContent = follow.checked ? 'following' : '';
    const onLine = line => {
      logBox.append(h('div', {}, line));
      while (logBox.childElementCount > MAX_LOG_LINES) logBox.firstElementChild.remove();
      if (logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 80) logBox.scrollTop = logBox.scrollHeight;
    };
    streamLogs(id, { tail: Math.max(0, Math.min(10000, parseInt(tail.value, 10) || 0)), follow: follow.checked, signal: ctl.signal, onLine })
      .then(() => { if (cur.logs === ctl) logState.textContent = 'ended'; })
      .catch(e => { if (e.name !== 'AbortError' && cur.logs === ctl) logState.textContent = e.detail ?? e.message; });
  };

  const loadFiles = async () => {
    filesBox.textContent = 'reading\u2026';
    try { filesBox.textContent = (await api(`nodes/${encodeURIComponent(id)}/files`)).tree; }
    catch (e) { filesBox.textContent = e.detail ?? e.message; }
  };

  fill(el,
    h('h1', {}, 'Session ', h('code', { id: 'session-id' }, id), ' ', actionsBox),
    h('div', { class: 'toolbar', id: 'copies' }, forkCount,
      h('button', { type: 'button', id: 'fork', onclick: doFork }, 'fork'), snapName,
      h('button', { type: 'button', id: 'snapshot', onclick: doSnapshot }, 'snapshot'), copyResult),
    recordBox,
    h('div', { class: 'cols', id: 'egress' },
      h('div', {}, h('h2', {}, 'Egress policy'), policyBox),
      h('div', {}, h('h2', {}, 'Egress refused'), deniedBox, h('h2', {}, 'Secrets used'), secretsBox)),
    h('div', { class: 'cols' },
      h('div', {}, h('h2', {}, 'Log'),
        h('div', { class: 'toolbar' }, h('label', {}, 'tail ', tail), h('label', {}, follow, ' follow'),
          h('button', { type: 'button', onclick: startLogs }, 'reload'), logState),
        logBox),
      h('div', {}, h('h2', {}, 'Events'), eventsBox)),
    h('div', { class: 'cols' },
      h('div', {}, h('h2', {}, 'Terminal ', h('span', { class: 'muted' }, '(/ws/shell: one command per line; Ctrl-C stops it)')), termBox),
      h('div', {}, h('h2', {}, 'Workspace ', h('button', { type: 'button', onclick: loadFiles }, 'refresh')), filesBox)),
  );
  follow.addEventListener('change', startLogs);

  cur.events = events({
    nodeId: id, replay: true,
    onEvent: ev => {
      eventsBox.prepend(h('div', {}, `${new Date(ev.at * 1000).toLocaleTimeString()}  ${ev.event}`,
        ev.detail ? `  ${ev.detail}` : '', h('span', { class: 'muted' }, `  by ${ev.replica_id}`)));
      if (current !== cur) return;
      if (ev.event === 'egress_refused') egressRow(deniedBox, ev);
      else if (ev.event === 'egress_secret') egressRow(secretsBox, ev);
      else if (ev.event === 'egress_policy') loadPolicy();
      loadRecord();
    },
  });
  loadPolicy();
  loadRecord();
  startLogs();
  loadFiles();
  startTerminal(cur, termBox, id);
}

function startTerminal(cur, box, id) {
  const term = cur.term = new Terminal({ convertEol: true, fontSize: 13, rows: 18, cursorBlink: true, scrollback: 2000 });
  term.open(box);
  const prompt = () => term.write(`\x1b[32m${id.slice(0, 12)}\x1b[0m $ `);
  let line = '';
  term.write('Commands run with bash -c in the node, one per line.\n');
  prompt();
  const run = command => {
    const ws = cur.shell = new WebSocket(wsUrl(`/ui/ws/shell/${encodeURIComponent(id)}`));
    ws.onopen = () => ws.send(JSON.stringify({ command, timeout: 600 }));
    ws.onmessage = e => {
      let m;
      try { m = JSON.parse(e.data); } catch { term.write(String(e.data) + '\n'); return; }
      if (m.type === 'stdout') term.write(m.line + '\n');
      else if (m.type === 'stderr') term.write(`\x1b[31m${m.line}\x1b[0m\n`);
      else if (m.type === 'exit') { if (m.code) term.write(`\x1b[2m[exit ${m.code}]\x1b[0m\n`); }
      else if (m.type === 'error') term.write(`\x1b[31m${m.message}\x1b[0m\n`);
    };
    ws.onclose = e => {
      if (e.code !== 1000 && e.code !== 1005) term.write(`\x1b[31m[closed ${e.code}${e.reason ? ': ' + e.reason : ''}]\x1b[0m\n`);
      if (cur.shell === ws) { cur.shell = null; prompt(); }
    };
  };
  term.onData(data => {
    if (cur.shell) {  // a command runs: only Ctrl-C, which stops it
      if (data.includes('\x03')) { term.write('^C\n'); cur.shell.close(); }
      return;
    }
    for (const ch of data) {
      if (ch === '\r') {
        term.write('\n');
        const cmd = line;
        line = '';
        if (cmd.trim()) { run(cmd); return; }
        prompt();
      } else if (ch === '\x7f' || ch === '\b') {
        if (line) { line = line.slice(0, -1); term.write('\b \b'); }
      } else if (ch === '\x03') {
        line = ''; term.write('^C\n'); prompt();
      } else if (ch >= ' ') {
        line += ch; term.write(ch);
      }
    }
  });
}
