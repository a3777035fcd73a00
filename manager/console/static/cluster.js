// The cluster view: replicas, checker leases, sessions by status per manager_id, warm pool, quotas.
import { h, fill, table, age, since, confirmButton } from './dom.js';
import { api } from './api.js';

function countBy(rows, key) {
  const out = {};
  for (const r of rows) out[key(r)] = (out[key(r)] ?? 0) + 1;
  return out;
}

export function renderCluster(el, state, refresh) {
  const { replicas, leases, nodes, config } = state;
  const sessions = nodes.filter(n => n.role !== 'pooled');
  const mids = [...new Set([...replicas.map(r => r.manager_id), ...leases.map(l => l.manager_id),
    ...nodes.map(n => n.manager_id)])].sort();
  const statuses = [...new Set(sessions.map(n => n.tier || n.status))].sort();
  const byMid = Object.fromEntries(mids.map(m => [m, countBy(sessions.filter(n => n.manager_id === m), n => n.tier || n.status)]));
  const draining = Object.fromEntries(replicas.map(r => [r.manager_id, r.draining]));
  const poolSize = config?.pool?.size ?? 0;
  const perClient = config?.quota?.per_client;  // null: a quarter of the manager_id's cap
  const perManager = config?.cluster?.max_nodes_per_manager ?? 0;
  const clients = countBy(sessions.filter(n => n.client), n => n.client);

  const drainButton = mid => draining[mid]
    ? confirmButton('undrain', `undrain:${mid}`, () => act(`managers/${encodeURIComponent(mid)}/drain`, 'DELETE', refresh))
    : confirmButton('drain', `drain:${mid}`, () => act(`managers/${encodeURIComponent(mid)}/drain`, 'POST', refresh));

  fill(el,
    h('h1', {}, 'Cluster'),
    h('h2', {}, 'Replicas'),
    table([['id', 'replica'], ['mid', 'manager_id'], ['url', 'address'], ['v', 'version'], ['age', 'age'],
      ['hb', 'heartbeat'], ['dr', 'draining']],
      replicas.map(r => [r.replica_id, r.manager_id, r.url, r.version, age(r.age_seconds), since(r.heartbeat_at) + ' ago',
        r.draining ? 'yes' : 'no'])),
    h('h2', {}, 'Checker leases'),
    table([['mid', 'manager_id'], ['holder', 'holder'], ['token', 'token'], ['since', 'held for'], ['left', 'time left']],
      leases.map(l => [l.manager_id, l.holder ?? 'none', l.token ?? '', l.since ? since(l.since) : '',
        l.expires_in_ms != null ? `${(l.expires_in_ms / 1000).toFixed(1)} s` : ''])),
    h('h2', {}, 'Sessions by status'),
    table([['mid', 'manager_id'], ...statuses.map(s => [s, s]), ['total', 'total'],
      ['cap', 'cap'], ['pool', 'warm pool'], ['drain', '']],
      mids.map(m => [m, ...statuses.map(s => byMid[m][s] ?? 0),
        Object.values(byMid[m]).reduce((a, b) => a + b, 0),
        perManager > 0 ? perManager : perManager < 0 ? 'none' : 'engine memory',
        `${nodes.filter(n => n.manager_id === m && n.role === 'pooled').length} / ${poolSize}`,
        drainButton(m)])),
    h('h2', {}, 'Quota use by client'),
    Object.keys(clients).length
      ? table([['c', 'client'], ['n', 'sessions'], ['q', 'quota']],
        Object.entries(clients).sort().map(([c, n]) => [c, n, perClient == null ? '¼ of the cap' : perClient || 'unlimited']))
      : h('p', { class: 'muted' }, 'No session names a client.'),
  );
}

async function act(path, method, refresh) {
  await api(path, { method });
  refresh();
}
