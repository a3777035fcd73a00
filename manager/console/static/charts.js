// Session creation latency and proxied request rate from this replica's /metrics, sampled
// every few seconds while the page is open, drawn with uPlot.
import { h } from './dom.js';

const EVERY_MS = 5000, KEEP = 120;  // ten minutes of samples
const CREATE = 'toolserver_node_create_duration_seconds';
const REQUESTS = 'toolserver_proxy_requests_total';
const LINE = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/;
const samples = { t: [], latency: [], rate: [] };
let prev = null, timer = null;
const charts = [];

function totals(text) {
  const out = { sum: 0, count: 0, requests: 0 };
  for (const line of text.split('\n')) {
    const m = LINE.exec(line);
    if (!m) continue;
    const [, name, labels = '', value] = m;
    const v = parseFloat(value);
    if (!isFinite(v)) continue;
    // sessions handed out: new nodes that answered and warm-pool claims
    const delivered = /outcome="(ready|pool)"/.test(labels);
    if (name === CREATE + '_sum' && delivered) out.sum += v;
    else if (name === CREATE + '_count' && delivered) out.count += v;
    else if (name === REQUESTS) out.requests += v;
  }
  return out;
}

async function sample() {
  let text;
  try { text = await (await fetch('/metrics', { credentials: 'same-origin' })).text(); } catch { return; }
  const now = Date.now() / 1000, cur = totals(text);
  if (prev) {
    const dt = now - prev.t, dc = cur.count - prev.count;
    samples.t.push(now);
    samples.latency.push(dc > 0 ? (cur.sum - prev.sum) / dc : null);
    samples.rate.push(Math.max(0, cur.requests - prev.requests) / dt);
    for (const k of Object.keys(samples)) if (samples[k].length > KEEP) samples[k].shift();
    for (const c of charts) c.plot.setData([samples.t, samples[c.key]]);
  }
  prev = { t: now, ...cur };
}

function chart(key, title, label, unit) {
  const el = h('div', { class: 'card chart', 'data-chart': key });
  const U = window.uPlot;
  if (!U) return h('p', { class: 'error' }, 'uPlot did not load: run scripts/setup.sh');
  const plot = new U({
    title, width: 440, height: 170,
    series: [{}, { label, stroke: '#2457c5', width: 2, spanGaps: false, points: { show: true, size: 4 },
      value: (u, v) => v == null ? '-' : `${v.toFixed(unit === 's' ? 3 : 2)} ${unit}` }],
    axes: [{}, { size: 60, values: (u, vals) => vals.map(v => `${v} ${unit}`) }],
    scales: { y: { range: (u, lo, hi) => [0, Math.max(hi ?? 0, unit === 's' ? 0.5 : 1)] } },
  }, [samples.t, samples[key]], el);
  charts.push({ key, plot });
  return el;
}

/** The two charts (made once; they keep sampling while the page is open). */
export function chartsPanel() {
  if (!timer) { sample(); timer = setInterval(sample, EVERY_MS); }
  charts.length = 0;
  return h('div', { class: 'grid' },
    chart('latency', 'Session creation latency (this replica)', 'mean', 's'),
    chart('rate', 'Proxied requests (this replica)', 'rate', '/s'));
}
