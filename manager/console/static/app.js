// The console's entry: log-in, routing between views (#/cluster, #/sessions, #/session/<id>),
// the shared state, kept fresh by the events stream.
import { h, fill } from './dom.js';
import { api, events, login, logout, whenLoggedOut, whoami } from './api.js';
import { renderCluster } from './cluster.js';
import { chartsPanel } from './charts.js';
import { renderSessions } from './sessions.js';
import { closeSession, openSession, openSessionId } from './session.js';

const $ = id => document.getElementById(id);
const state = { nodes: [], replicas: [], leases: [], config: null };
const ctx = { actions: ['stop', 'restart', 'release'], refresh: () => refresh(), flash };
let stream = null, clusterBody = null, refreshTimer = null, refreshing = null, again = false;

function flash(message) {
  $('flash').textContent = message;
  setTimeout(() => { if ($('flash').textContent === message) $('flash').textContent = ''; }, 8000);
}

function show(section) {
  for (const id of ['login', 'cluster', 'sessions', 'session']) $(id).hidden = id !== section;
  $('nav-cluster').classList.toggle('active', section === 'cluster');
  $('nav-sessions').classList.toggle('active', section === 'sessions');
}

async function load() {
  const [nodes, replicas, leases] = await Promise.all([api('nodes?limit=1000'), api('replicas'), api('leases')]);
  state.nodes = nodes.nodes;
  state.replicas = replicas.replicas;
  state.leases = leases.leases;
  if (!state.config) state.config = await api('config');
}

/** Reload the lists and redraw the view; calls while one runs fold into one more. */
async function refresh() {
  if (refreshing) { again = true; return refreshing; }
  refreshing = (async () => {
    do {
      again = false;
      try { await load(); } catch (e) { if (e.status !== 401) flash(e.detail ?? e.message); return; }
      draw(false);
    } while (again);
  })().finally(() => { refreshing = null; });
  return refreshing;
}

function draw(routeChanged) {
  const [, view, id] = location.hash.split('/');
  if (view === 'session' && id) {
    show('session');
    // the first draw after log-in may come after the route's own: a view already open stays as it
    // is (a second one would drop what was typed into the first, as a fork count once was)
    if (routeChanged && openSessionId() !== decodeURIComponent(id)) openSession($('session'), decodeURIComponent(id), ctx);
    return;
  }
  closeSession();
  if (view === 'sessions') {
    show('sessions');
    renderSessions($('sessions'), state, ctx);
  } else {
    show('cluster');
    if (!clusterBody) {
      clusterBody = h('div');
      fill($('cluster'), clusterBody, h('h2', {}, 'At a glance'), chartsPanel());
    }
    renderCluster(clusterBody, state, refresh);
  }
}

async function start(me) {
  $('nav').hidden = false;
  $('who').textContent = `replica ${me.replica_id} (${me.manager_id}), v${me.version}`;
  if (Array.isArray(me.actions)) ctx.actions = me.actions;
  stream?.close();
  stream = events({
    onEvent: () => { clearTimeout(refreshTimer); refreshTimer = setTimeout(refresh, 100); },
    onState: on => { $('live').textContent = on ? 'live' : 'reconnecting'; $('live').classList.toggle('on', on); },
  });
  await refresh();
  draw(true);
  if (!start.timer) start.timer = setInterval(refresh, 10000);  // leases' time left and ages move without events
}

function showLogin(message = '') {
  stream?.close();
  stream = null;
  closeSession();
  $('nav').hidden = true;
  $('login-error').textContent = message;
  show('login');
  $('token').focus();
}

whenLoggedOut(() => showLogin('Your login expired: log in again.'));
window.addEventListener('hashchange', () => draw(true));
$('login-form').addEventListener('submit', async e => {
  e.preventDefault();
  const token = $('token').value;
  $('token').value = '';
  try {
    await login(token);
  } catch (err) {
    $('login-error').textContent = err.status === 403 ? 'Wrong token.' : (err.detail ?? err.message);
    return;
  }
  $('login-error').textContent = '';
  await start(await whoami());
});
$('logout').addEventListener('click', async () => { await logout().catch(() => {}); showLogin(); });

/** Who is logged in, asked again while the replica does not answer: only its word (401) asks for
 * the token at once; after about 8 s of no answer the form comes with the reason. */
async function boot(delay = 250) {
  let me;
  try {
    me = await whoami();
  } catch (err) {
    const why = `The manager did not answer (${err.detail ?? err.message})`;
    if (err.status === 401 || err.status === 403) { showLogin(); return; }
    if (delay > 4000) { showLogin(`${why}.`); return; }
    // busy, restarting or behind a balancer between replicas: a login form would not help yet
    flash(`${why}: retrying.`);
    setTimeout(() => boot(delay * 2), delay);
    return;
  }
  await start(me);
}

boot();
