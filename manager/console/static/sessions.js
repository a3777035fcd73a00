// Every session across all manager_ids: filter, sort, CPU and memory on demand, actions.
import { h, fill, table, age, bytes, confirmButton } from './dom.js';
import { api } from './api.js';

const view = { filter: '', status: '', sortKey: 'created_at', sortDir: -1 };
const stats = new Map();  // node id -> text shown in the usage column

const COLUMNS = [['id', 'session'], ['manager_id', 'owner'], ['status', 'status'], ['role', 'role'],
  ['client', 'client'], ['created_at', 'age'], ['idle_seconds', 'last activity'], ['usage', 'CPU / memory'],
  ['actions', '']];

export async function runAction(id, action, refresh, flash) {
  try {
    await api(`nodes/${encodeURIComponent(id)}/${action}`, { method: 'POST' });
  } catch (e) {
    flash(`${action} ${id.slice(0, 12)}: ${e.detail ?? e.message}`);
  }
  refresh();
}

export function actionButtons(n, actions, refresh, flash) {
  // tiers (running, paused, stopped, archived) once records carry them; else the status alone
  const idle = ['paused', 'stopped', 'archived', 'exited'].includes(n.tier || n.status);
  const enabled = a => n.status !== 'released' && !(a === 'stop' && n.status !== 'running')
    && !(a === 'pause' && n.status !== 'running') && !(a === 'resume' && !idle);
  return h('span', { class: 'toolbar' }, actions.filter(enabled).map(
    a => confirmButton(a, `${a}:${n.id}`, () => runAction(n.id, a, refresh, flash))));
}

async function loadStats(n, rerender) {
  stats.set(n.id, 'reading\u2026');
  rerender();
  try {
    const d = await api(`nodes/${encodeURIComponent(n.id)}`);
    const s = d.stats;
    stats.set(n.id, s ? `${(s.cpu_total_ns / 1e9).toFixed(2)} CPU s, ${bytes(s.memory_bytes)} of ${bytes(s.memory_limit_bytes)}`
      : 'not running');
  } catch (e) {
    stats.set(n.id, e.detail ?? e.message);
  }
  rerender();
}

// the snapshots (every client's), read on demand: one Redis read each, not one per refresh; the box
// outlives the view's re-renders so what was read stays shown
const snapBox = h('div', { id: 'snapshots' });

async function loadSnapshots(box, flash) {
  try {
    const snaps = (await api('snapshots')).snapshots;
    const now = Date.now() / 1000;
    const reload = () => loadSnapshots(box, flash);
    fill(box, snaps.length ? table([['name', 'name'], ['manager_id', 'host'], ['bytes', 'size'], ['source', 'source'],
      ['client', 'client'], ['created_at', 'age'], ['actions', '']], snaps.map(s => [
      s.name, s.manager_id, bytes(s.bytes), h('td', {}, h('a', { class: 'node', href: `#/session/${encodeURIComponent(s.source)}` },
        s.source.slice(0, 12))), s.client || '', age(now - s.created_at),
      h('td', {}, confirmButton('delete', `delete-snapshot:${s.name}`, async () => {
        // names are per client: the client says whose (two clients may each keep one of this name)
        try { await api(`snapshots/${encodeURIComponent(s.name)}?client=${encodeURIComponent(s.client)}`, { method: 'DELETE' }); }
        catch (e) { flash(`delete ${s.name}: ${e.detail ?? e.message}`); }
        reload();
      })),
    ]), {}) : h('p', { class: 'muted' }, 'no snapshots'));
  } catch (e) { fill(box, h('p', { class: 'error' }, e.detail ?? e.message)); }
}

export function renderSessions(el, state, ctx) {
  const rerender = () => renderSessions(el, state, ctx);
  const now = Date.now() / 1000;
  const statuses = [...new Set(state.nodes.map(n => n.tier || n.status))].sort();
  let rows = state.nodes.filter(n => !view.status || (n.tier || n.status) === view.status);
  const key = view.sortKey;
  rows = rows.sort((a, b) => {
    const x = a[key] ?? '', y = b[key] ?? '';
    return (x < y ? -1 : x > y ? 1 : 0) * view.sortDir;
  });
  const onSort = k => {
    if (k === 'actions' || k === 'usage') return;
    view.sortDir = view.sortKey === k ? -view.sortDir : 1;
    view.sortKey = k;
    rerender();
  };
  const filterBox = h('input', { type: 'search', id: 'filter', placeholder: 'filter: id, owner, client, status', value: view.filter });
  filterBox.addEventListener('input', () => { view.filter = filterBox.value; renderTable(); });
  const statusSel = h('select', { id: 'status-filter' }, h('option', { value: '' }, 'any status'),
    statuses.map(s => h('option', { value: s, selected: s === view.status }, s)));
  statusSel.addEventListener('change', () => { view.status = statusSel.value; rerender(); });
  const tableBox = h('div');
  const renderTable = () => {
    const q = view.filter.toLowerCase();
    const shown = rows.filter(n => !q || [n.id, n.manager_id, n.client, n.status, n.role, n.tier]
      .some(v => (v ?? '').toLowerCase().includes(q)));
    fill(tableBox, table(COLUMNS, shown.map(n => [
      h('td', {}, h('a', { class: 'node', href: `#/session/${encodeURIComponent(n.id)}`, 'data-node': n.id }, n.id.slice(0, 12))),
      n.manager_id, n.tier && n.tier !== n.status ? `${n.status} (${n.tier})` : n.status, n.role, n.client || '',
      age(now - n.created_at), n.idle_seconds != null ? age(n.idle_seconds) + ' ago' : '',
      h('td', {}, stats.has(n.id) ? stats.get(n.id) : h('button', { type: 'button', onclick: () => loadStats(n, rerender) }, 'read')),
      h('td', {}, actionButtons(n, ctx.actions, ctx.refresh, ctx.flash)),
    ]), { onSort, sortKey: view.sortKey, sortDir: view.sortDir }),
    h('p', { class: 'muted' }, `${shown.length} of ${state.nodes.length} sessions`));
  };
  const focused = document.activeElement?.id === 'filter';
  fill(el, h('h1', {}, 'Sessions'), h('div', { class: 'toolbar' }, filterBox, statusSel), tableBox,
    h('h2', {}, 'Snapshots ', h('button', { type: 'button', id: 'list-snapshots', onclick: () => loadSnapshots(snapBox, ctx.flash) }, 'list')),
    snapBox);
  renderTable();
  if (focused) { filterBox.focus(); filterBox.setSelectionRange(filterBox.value.length, filterBox.value.length); }
}
