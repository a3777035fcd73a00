// Building the page: every string goes in as a text node (never markup), whoever wrote it.

/** An element with attributes (on* = listeners) and children (strings become text nodes). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table from column names and rows of cells. */
export function table(columns, rows, {onSort, sortKey, sortDir} = {}) {
  const head = h('tr', {}, columns.map(([key, label]) => {
    const mark = key === sortKey ? (sortDir > 0 ? ' \u25b2' : ' \u25bc') : '';
    return h('th', onSort ? { class: 'sortable', onclick: () => onSort(key) } : {}, label + mark);
  }));
  return h('table', {}, h('thead', {}, head), h('tbody', {}, rows.map(cells => h('tr', {}, cells.map(c => c instanceof Node && c.tagName === 'TD' ? c : h('td', {}, c))))));
}

export function age(seconds) {
  if (seconds == null || !isFinite(seconds)) return '';
  seconds = Math.max(0, seconds);
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

export function since(ts) { return ts ? age(Date.now() / 1000 - ts) : ''; }

export function bytes(n) {
  if (n == null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const pending = new Map();  // "action:id" -> time of the first click, kept across re-renders

/** A button that asks for a second click within 4 s before it acts. */
export function confirmButton(label, key, act) {
  const armed = () => (pending.get(key) ?? 0) > Date.now() - 4000;
  const b = h('button', { type: 'button', 'data-action': key }, armed() ? `confirm ${label}?` : label);
  if (armed()) b.classList.add('confirm');
  b.addEventListener('click', async () => {
    if (!armed()) {
      pending.set(key, Date.now());
      b.textContent = `confirm ${label}?`;
      b.classList.add('confirm');
      setTimeout(() => { if (!armed() && b.isConnected) { b.textContent = label; b.classList.remove('confirm'); } }, 4100);
      return;
    }
    pending.delete(key);
    b.disabled = true;
    b.textContent = `${label}\u2026`;
    try { await act(); } finally { b.disabled = false; b.textContent = label; b.classList.remove('confirm'); }
  });
  return b;
}
