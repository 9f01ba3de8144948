// TMS Gateway pages. Every page is a static shell; this script fills it from the JSON API
// (CONTRACT §5) with the signed-in user's bearer token, so the API's scoping is the pages'
// scoping. Data is only ever put into the page as text (textContent), never as HTML.
'use strict';

const TOKEN_KEY = 'tms.token';
const POLL_MS = 2000;

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** Creates an element: el('a', {href: '/x', class: 'y'}, 'text', otherNode). */
function el(tag, attrs = {}, ...children) {
  const svg = ['svg', 'g', 'path', 'circle', 'line', 'polyline', 'text', 'image', 'title'].includes(tag);
  const node = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

class ApiFailure extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.fields = error.fields || {};
  }
}

const token = () => localStorage.getItem(TOKEN_KEY);

/** Names each cell after its column (`data-label`), for tables shown as cards on phones. */
function labelCells(table) {
  const names = [...table.querySelectorAll('thead th')].map((th) => th.textContent);
  for (const tr of table.querySelectorAll('tbody tr')) {
    [...tr.children].forEach((td, i) => td.setAttribute('data-label', names[i] || ''));
  }
}

function toLogin() {
  localStorage.removeItem(TOKEN_KEY);
  location.assign('/login?next=' + encodeURIComponent(location.pathname + location.search));
}

/** Calls the API. Signs out on 401 and sends a user with a temporary password to change it. */
async function api(method, path, body, { accept = 'application/json', anonymous = false } = {}) {
  const headers = { Accept: accept };
  if (!anonymous && token()) headers.Authorization = 'Bearer ' + token();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.ok) {
    if (res.status === 204) return null;
    return accept === 'application/json' ? res.json() : res.blob();
  }
  const payload = await res.json().catch(() => ({}));
  const failure = new ApiFailure(res.status, payload.error || {});
  if (res.status === 401 && !anonymous) toLogin();
  if (failure.code === 'password_change_required' && document.body.dataset.page !== 'profile') {
    location.assign('/profile?required=1');
  }
  throw failure;
}

// ---- formatting ---------------------------------------------------------------------------

const STATE_TEXT = { online: 'Online', offline: 'Offline', never_connected: 'Never connected' };

function badge(status) {
  const span = el('span', { class: `badge state-${status.state}`, 'data-state': status.state, text: STATE_TEXT[status.state] || status.state });
  if (status.state === 'online' && status.silent) {
    return el('span', {}, span, el('span', { class: 'badge silent', title: 'Connected, but no telemetry for several of its usual intervals', text: 'Silent' }));
  }
  return span;
}

function ago(iso) {
  if (!iso) return '—';
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 5) return 'just now';
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : '—');

function timeEl(iso, relative = true) {
  if (!iso) return el('span', { class: 'muted', text: '—' });
  return el('time', { datetime: iso, title: when(iso), text: relative ? ago(iso) : when(iso) });
}

function days(n, iso) {
  if (n === null || n === undefined) return el('span', { class: 'muted', text: '—' });
  const text = n < 0 ? `ended ${iso ? iso.slice(0, 10) : ''}` : `${n} days`;
  return el('span', { class: n < 30 ? 'soon' : '', title: iso || '', text });
}

/** Fills a <dl> from [label, value] pairs; a value may be a string or a node. */
function facts(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', {}, v === null || v === undefined || v === '' ? '—' : v)]));
}

function showError(err, box = $('#form-error')) {
  if (box) box.textContent = err instanceof ApiFailure || err instanceof Error ? err.message : String(err);
}

/** Shows a 422's field messages next to their fields; answers whether any had a place. */
function showFieldErrors(form, fields) {
  let placed = 0;
  for (const [key, message] of Object.entries(fields)) {
    const slot = $(`.field-error[data-for="${CSS.escape(key)}"]`, form);
    if (!slot) continue;
    slot.textContent = message;
    const input = form.elements.namedItem(key);
    if (input && input.setAttribute) {
      input.setAttribute('aria-invalid', 'true');
      if (slot.id === '') slot.id = `err-${key.replace(/\W/g, '-')}`;
      const described = (input.getAttribute('aria-describedby') || '').split(' ').filter(Boolean);
      if (!described.includes(slot.id)) input.setAttribute('aria-describedby', [...described, slot.id].join(' '));
    }
    placed++;
  }
  const first = $('[aria-invalid="true"]', form);
  if (first) first.focus();
  return placed;
}

function clearErrors(form) {
  $$('.field-error', form).forEach((e) => (e.textContent = ''));
  $$('[aria-invalid]', form).forEach((e) => e.removeAttribute('aria-invalid'));
  const box = $('#form-error');
  if (box) box.textContent = '';
}

/** Client-side hints: the browser's own checks, shown in our error slots. */
function checkFields(form) {
  let ok = true;
  for (const input of form.elements) {
    if (!input.name || input.disabled || input.closest('[hidden]') || input.checkValidity()) continue;
    const slot = $(`.field-error[data-for="${CSS.escape(input.name)}"]`, form);
    if (slot) slot.textContent = input.validationMessage;
    input.setAttribute('aria-invalid', 'true');
    ok = false;
  }
  const first = $('[aria-invalid="true"]', form);
  if (first) first.focus();
  return ok;
}

/** Repeats `fn` every `ms` while the tab is visible; errors are shown, not thrown. */
function poll(fn, ms = POLL_MS) {
  let timer = null;
  const tick = async () => {
    clearTimeout(timer);
    try {
      await fn();
    } catch (err) {
      if (!(err instanceof ApiFailure && err.status === 401)) showError(err);
    }
    timer = setTimeout(tick, document.hidden ? ms * 5 : ms);
  };
  tick();
}

function download(a, name, data, type) {
  const blob = data instanceof Blob ? data : new Blob([data], { type });
  a.href = URL.createObjectURL(blob);
  a.download = name;
}

// ---- a minimal zip writer (stored entries), so the key is made once and offered 3 ways ------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function zip(files) {
  const enc = new TextEncoder();
  const parts = [];
  const central = [];
  let offset = 0;
  for (const [name, text] of files) {
    const nameBytes = enc.encode(name);
    const data = enc.encode(text);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true);
    local.setUint16(8, 0, true); // stored
    local.setUint32(14, crc, true);
    local.setUint32(18, data.length, true);
    local.setUint32(22, data.length, true);
    local.setUint16(26, nameBytes.length, true);
    const dir = new DataView(new ArrayBuffer(46));
    dir.setUint32(0, 0x02014b50, true);
    dir.setUint16(4, 20, true);
    dir.setUint16(6, 20, true);
    dir.setUint32(16, crc, true);
    dir.setUint32(20, data.length, true);
    dir.setUint32(24, data.length, true);
    dir.setUint16(28, nameBytes.length, true);
    dir.setUint32(42, offset, true);
    parts.push(local, nameBytes, data);
    central.push(dir, nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = central.reduce((n, p) => n + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, files.length, true);
  end.setUint16(10, files.length, true);
  end.setUint32(12, size, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end], { type: 'application/zip' });
}

// ---- pages ---------------------------------------------------------------------------------

const pages = {};

pages.login = () => {
  const params = new URLSearchParams(location.search);
  if (params.get('activated')) {
    const n = $('#login-notice');
    n.textContent = 'Your account is active. Sign in with the temporary password from the second email.';
    n.hidden = false;
  }
  const form = $('#login-form');
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors(form);
    const button = $('button', form);
    button.disabled = true;
    try {
      const res = await api('POST', '/api/v1/auth/login', { email: form.email.value.trim(), password: form.password.value }, { anonymous: true });
      localStorage.setItem(TOKEN_KEY, res.token);
      const next = params.get('next');
      const safeNext = next && next.startsWith('/') && !next.startsWith('//') ? next : '/devices';
      location.assign(res.must_change_password ? '/profile?required=1' : safeNext);
    } catch (err) {
      showError(err.status === 401 ? 'The email or password is not right, or the account is not activated yet.' : err);
      button.disabled = false;
    }
  });
};

pages.activate = () => {
  const params = new URLSearchParams(location.search);
  const activationToken = params.get('token');
  // The token stays out of the address bar (and so out of history and screenshots).
  history.replaceState(null, '', '/activate');
  const button = $('#activate');
  if (!activationToken) {
    button.hidden = true;
    showError('This link has no activation token. Open the link from the activation email again.');
    return;
  }
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await api('POST', '/api/v1/auth/activate', { token: activationToken }, { anonymous: true });
      button.hidden = true;
      $('#activate-intro').hidden = true;
      $('#activate-done').hidden = false;
    } catch (err) {
      showError(err);
      button.disabled = false;
    }
  });
};

pages.profile = (me) => {
  const required = me.must_change_password;
  $('#password-required').hidden = !required;
  facts($('#account'), [
    ['Name', `${me.first_name || ''} ${me.last_name || ''}`.trim()],
    ['Email', me.email],
    ['Phone', me.phone],
    ['Role', me.role],
    ['Member since', when(me.created_at)],
  ]);
  const form = $('#password-form');
  if (required) form.current_password.setAttribute('aria-describedby', 'password-required');
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors(form);
    $('#password-done').hidden = true;
    if (!checkFields(form)) return;
    if (form.new_password.value !== form.confirm_password.value) {
      showFieldErrors(form, { confirm_password: 'The two new passwords differ.' });
      return;
    }
    try {
      await api('POST', '/api/v1/me/password', { current_password: form.current_password.value, new_password: form.new_password.value });
      form.reset();
      if (required) {
        location.assign('/devices');
      } else {
        $('#password-done').hidden = false;
      }
    } catch (err) {
      if (!showFieldErrors(form, err.fields)) showError(err);
    }
  });
};

pages.register = async () => {
  const form = $('#register-form');
  form.start_date.value = new Date().toISOString().slice(0, 10);
  const toggle = (kind) => {
    const value = form.elements[`${kind}-kind`].value;
    $$(`[data-kind^="${kind}-"]`, form).forEach((box) => {
      const on = box.dataset.kind === `${kind}-${value}`;
      box.hidden = !on;
      $$('input', box).forEach((i) => (i.required = on));
    });
  };
  for (const kind of ['user', 'company']) {
    $$(`input[name="${kind}-kind"]`, form).forEach((r) => r.addEventListener('change', () => toggle(kind)));
    toggle(kind);
  }
  // Companies this provider already serves, as suggestions for "existing company".
  api('GET', '/api/v1/devices').then((devices) => {
    const names = [...new Set(devices.map((d) => d.company).filter(Boolean))].sort();
    $('#companies').replaceChildren(...names.map((n) => el('option', { value: n })));
  }).catch(() => {});

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors(form);
    if (!checkFields(form)) return;
    const v = (name) => form.elements[name].value.trim();
    const opt = (name) => v(name) || undefined;
    const body = {
      user: form.elements['user-kind'].value === 'new'
        ? { new: { first_name: v('user.new.first_name'), last_name: v('user.new.last_name'), email: v('user.new.email'), phone: v('user.new.phone') } }
        : { existing: { email: v('user.existing.email') } },
      company: form.elements['company-kind'].value === 'new'
        ? { new: { name: v('company.new.name') } }
        : { existing: { name: v('company.existing.name') } },
      sales_order: opt('sales_order'),
      device: { type: opt('device.type'), serial: v('device.serial'), mac: v('device.mac'), lease_months: Number(v('device.lease_months') || 12) },
      ups: { model: v('ups.model'), model_number: v('ups.model_number'), serial: v('ups.serial'), ship_date: opt('ups.ship_date') },
      start_date: v('start_date'),
      service_contract_sales_order: opt('service_contract_sales_order'),
    };
    if (v('location.lat') || v('location.lon')) {
      body.location = { lat: v('location.lat') === '' ? null : Number(v('location.lat')), lon: v('location.lon') === '' ? null : Number(v('location.lon')) };
    }
    const button = $('button[type="submit"]', form);
    button.disabled = true;
    try {
      const res = await api('POST', '/api/v1/registrations', body);
      const who = body.user.new ? `${body.user.new.first_name} ${body.user.new.last_name} <${body.user.new.email}>` : body.user.existing.email;
      facts($('#registered-facts'), [
        ['Device', res.device_serial],
        ['Customer', `${who}${res.user_created ? ' (new account)' : ''}`],
        ['Company', `${body.company.new ? body.company.new.name : body.company.existing.name}${res.company_created ? ' (new)' : ''}`],
        ['Emails', res.emails.length ? 'Activation link and temporary password sent to the customer.' : 'None: the customer already has an account.'],
      ]);
      $('#registered-device').href = `/devices/${encodeURIComponent(res.device_serial)}`;
      form.hidden = true;
      const done = $('#registered');
      done.hidden = false;
      done.focus();
    } catch (err) {
      if (!showFieldErrors(form, err.fields)) showError(err);
      else showError(`${err.status === 409 ? 'Already registered' : 'Please correct the marked fields'}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  });
};

pages.devices = (me) => {
  const form = $('#filter');
  const params = new URLSearchParams(location.search);
  form.q.value = params.get('q') || '';
  form.state.value = params.get('state') || '';
  const body = $('#devices tbody');
  const refresh = async () => {
    const query = new URLSearchParams();
    if (form.q.value.trim()) query.set('q', form.q.value.trim());
    if (form.state.value) query.set('state', form.state.value);
    const [devices, active] = await Promise.all([api('GET', '/api/v1/devices?' + query), api('GET', '/api/v1/alarms?state=active&limit=1000')]);
    const alarmsOf = new Map();
    for (const a of active) alarmsOf.set(a.serial, (alarmsOf.get(a.serial) || 0) + 1);
    body.replaceChildren(...devices.map((d) => el('tr', { 'data-serial': d.serial },
      el('td', {}, el('a', { href: `/devices/${encodeURIComponent(d.serial)}`, text: d.serial })),
      el('td', { text: d.company }),
      el('td', { text: d.ups.model }),
      el('td', { class: 'status' }, badge(d.status), alarmBadge(d.serial, alarmsOf.get(d.serial))),
      el('td', {}, timeEl(d.status.last_seen)),
      el('td', {}, days(d.certificate_days_left, d.certificate_not_after)),
      el('td', {}, days(d.lease_days_left, d.lease_end)),
    )));
    labelCells($('#devices'));
    $('#empty').hidden = devices.length > 0;
    $('#updated').textContent = `${devices.length} device${devices.length === 1 ? '' : 's'} · updated ${new Date().toLocaleTimeString()}`;
    $('#form-error').textContent = '';
    if (me && me.role === 'admin') await refreshPeers();
  };
  // Attempts that named no device of ours, per peer address: admins only (no customer owns them).
  const refreshPeers = async () => {
    const peers = await api('GET', '/api/v1/refusals?limit=50');
    $('#no-peers').hidden = peers.length > 0;
    $('#peers').hidden = peers.length === 0;
    $('#peers tbody').replaceChildren(...peers.map((p) => el('tr', { 'data-peer': p.peer_ip, 'data-reason': p.reason },
      el('td', {}, el('code', { text: p.peer_ip })),
      el('td', {}, el('strong', { text: REFUSAL_TEXT[p.reason] || p.reason }), el('br'), el('code', { text: p.reason })),
      el('td', { class: 'detail', text: p.detail }),
      el('td', { text: String(p.attempts) }),
      el('td', {}, timeEl(p.last_at)),
    )));
    labelCells($('#peers'));
  };
  const changed = () => {
    const query = new URLSearchParams();
    if (form.q.value.trim()) query.set('q', form.q.value.trim());
    if (form.state.value) query.set('state', form.state.value);
    history.replaceState(null, '', '/devices' + (query.toString() ? '?' + query : ''));
    refresh().catch(showError);
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); changed(); });
  form.q.addEventListener('input', changed);
  form.state.addEventListener('change', changed);
  poll(refresh);
};

function chart(container, rows) {
  // rows: newest first; draw oldest → newest, load % and battery charge %.
  const points = rows.slice().reverse().map((r) => ({
    t: Date.parse(r.ts),
    load: typeof r.payload.load_pct === 'number' ? r.payload.load_pct : null,
    battery: r.payload.battery && typeof r.payload.battery.charge_pct === 'number' ? r.payload.battery.charge_pct : null,
  }));
  if (points.length === 0) {
    container.replaceChildren(el('p', { class: 'muted', text: 'No telemetry yet.' }));
    return;
  }
  const W = 600, H = 160, L = 30, R = 6, T = 8, B = 18;
  // Readings stamped in the same second (a burst) are spread evenly rather than stacked.
  const t0 = points[0].t, t1 = points[points.length - 1].t;
  const byTime = t1 - t0 >= 1000;
  points.forEach((p, i) => (p.x = byTime ? (p.t - t0) / (t1 - t0) : points.length > 1 ? i / (points.length - 1) : 0.5));
  const x = (p) => L + p.x * (W - L - R);
  const y = (v) => T + (1 - Math.min(Math.max(v, 0), 100) / 100) * (H - T - B);
  const line = (key) => points.filter((p) => p[key] !== null).map((p) => `${x(p).toFixed(1)},${y(p[key]).toFixed(1)}`).join(' ');
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `Load and battery charge, last ${points.length} readings` });
  for (const v of [0, 50, 100]) {
    svg.append(el('line', { class: 'grid-line', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(el('text', { class: 'axis', x: 2, y: y(v) + 3, text: `${v}%` }));
  }
  svg.append(el('text', { class: 'axis', x: L, y: H - 4, text: new Date(t0).toLocaleTimeString() }));
  svg.append(el('text', { class: 'axis', x: W - R - 60, y: H - 4, text: new Date(t1).toLocaleTimeString() }));
  const one = (pts, cls) => (pts.includes(' ') ? el('polyline', { class: cls, points: pts }) : pts ? el('circle', { class: cls, cx: pts.split(',')[0], cy: pts.split(',')[1], r: 3 }) : null);
  svg.append(...[one(line('load'), 'load'), one(line('battery'), 'battery')].filter(Boolean));
  container.replaceChildren(
    el('div', { class: 'chart' }, svg),
    el('p', { class: 'chart-legend' }, el('span', { class: 'k-load', text: '━ Load %' }), '  ', el('span', { class: 'k-battery', text: '╍ Battery charge %' })),
  );
}

const REFUSAL_TEXT = {
  unknown_ca: 'Certificate not issued by this gateway',
  expired: 'Certificate expired',
  not_yet_valid: 'Certificate not yet valid (device clock?)',
  revoked: 'Certificate revoked',
  superseded: 'Replaced by a newer certificate',
  lease_expired: 'Lease ended',
  client_id_mismatch: 'MQTT client id differs from the certificate',
  acl_denied: 'Topic not allowed',
  protocol_error: 'MQTT protocol error',
  handshake_timeout: 'Handshake too slow',
  tls_error: 'TLS error',
  connection_limit: 'Gateway at its connection limit',
  no_client_certificate: 'No client certificate',
  invalid_certificate: 'Certificate unreadable',
  invalid_identity: 'Certificate has no usable serial (CN)',
  server_name_mismatch: 'Client refused the server certificate (broker name?)',
};

pages.device = () => {
  const serial = decodeURIComponent(location.pathname.split('/')[2] || '');
  document.title = `${serial} · TMS Gateway`;
  $('h1').textContent = `Device ${serial}`;
  const base = `/api/v1/devices/${encodeURIComponent(serial)}`;
  let slow = 0;
  const refresh = async () => {
    let d;
    try {
      d = await api('GET', base);
    } catch (err) {
      if (err.status === 404) {
        $('#device').hidden = true;
        showError(`No device ${serial} that you may see.`);
        return;
      }
      throw err;
    }
    $('#device').hidden = false;
    $('#form-error').textContent = '';
    const s = d.status;
    facts($('#status'), [
      ['Status', badge(s)],
      ['Since', timeEl(s.since)],
      ['Last seen', timeEl(s.last_seen)],
      ['From', s.peer_addr],
      ['Keep-alive', s.keep_alive_secs ? `${s.keep_alive_secs} s` : null],
      ['Last disconnect', s.last_disconnect_reason],
      ['Last telemetry', timeEl(s.last_telemetry_at)],
      ['Usual interval', s.telemetry_interval_secs ? `${s.telemetry_interval_secs.toFixed(1)} s` : null],
      ['Last refusal', s.last_connect_error ? `${REFUSAL_TEXT[s.last_connect_error] || s.last_connect_error} (${ago(s.last_connect_error_at)})` : null],
    ]);
    const refusals = d.recent_refusals;
    $('#no-refusals').hidden = refusals.length > 0;
    $('#refusals').hidden = refusals.length === 0;
    $('#refusals tbody').replaceChildren(...refusals.map((r) => el('tr', { 'data-reason': r.reason },
      el('td', {}, el('strong', { text: REFUSAL_TEXT[r.reason] || r.reason }), el('br'), el('code', { text: r.reason })),
      el('td', { class: 'detail', text: r.detail || '' }),
      el('td', {}, timeEl(r.last_at), el('br'), el('span', { class: 'muted', text: `${r.attempts} attempt${r.attempts === 1 ? '' : 's'}${r.peer_addr ? ` from ${r.peer_addr}` : ''}` })),
    )));
    labelCells($('#refusals'));
    const rejected = await api('GET', `${base}/quarantine?limit=20`);
    $('#no-quarantine').hidden = rejected.length > 0;
    $('#quarantine').hidden = rejected.length === 0;
    $('#quarantine tbody').replaceChildren(...rejected.map((q) => el('tr', {},
      el('td', { class: 'detail' }, el('strong', { text: q.error }), el('br'), el('code', { text: q.topic })),
      el('td', { class: 'detail' }, el('code', { text: q.payload }), el('br'), el('span', { class: 'muted', text: `${q.payload_bytes} bytes` })),
      el('td', {}, timeEl(q.received_at)),
    )));
    labelCells($('#quarantine'));
    const commands = d.commands || [];
    $('#no-commands').hidden = commands.length > 0;
    $('#commands').hidden = commands.length === 0;
    $('#commands tbody').replaceChildren(...commands.map((c) => el('tr', { 'data-id': c.id, 'data-state': c.state },
      el('td', {}, el('code', { text: c.name }), el('br'), el('span', { class: 'muted', text: c.created_by })),
      el('td', {}, el('strong', { text: COMMAND_TEXT[c.state] || c.state }), el('br'),
        el('span', { class: 'muted', text: c.delivered_at ? `delivered ${ago(c.delivered_at)}` : `until ${when(c.expires_at)}` })),
      el('td', {}, timeEl(c.created_at)),
      el('td', { class: 'detail', text: c.reply ? `${c.reply.ok ? 'ok' : 'failed'}${c.reply.message ? `: ${c.reply.message}` : ''}` : '' }),
    )));
    labelCells($('#commands'));
    facts($('#registration'), [
      ['Device type', d.device_type],
      ['MAC', d.mac],
      ['Company', d.company],
      ['UPS', `${d.ups.model || ''} (${d.ups.model_number || ''}), S/N ${d.ups.serial || ''}`],
      ['UPS system name', d.ups_identity.system_name ? `${d.ups_identity.system_name}${d.ups_identity.mismatch ? ' — does not match the registration' : ''}` : null],
      ['Ship date', d.ups.ship_date],
      ['Sales order', d.sales_order],
      ['Service contract', d.service_contract_sales_order],
      ['Start date', d.start_date],
      ['Lease', el('span', {}, `${d.lease_months} months, ends ${d.lease_end} · `, days(d.lease_days_left, d.lease_end))],
    ]);
    const loc = d.location;
    const cert = d.certificate;
    facts($('#location'), [
      ['Location', loc ? `${loc.lat.toFixed(5)}, ${loc.lon.toFixed(5)}${loc.accuracy_m ? ` ±${loc.accuracy_m} m` : ''}` : 'not known'],
      ['Location source', loc ? `${loc.source}, ${ago(loc.updated_at)}` : null],
      ['Map', loc ? el('a', { href: `/map#${encodeURIComponent(d.serial)}`, text: 'Show on the map' }) : null],
      ['Certificate', cert ? `valid until ${when(cert.not_after)}` : 'none valid'],
      ['Fingerprint', cert ? el('code', { text: cert.sha256_fingerprint }) : null],
      ['Manage', el('a', { href: `/certificates?serial=${encodeURIComponent(d.serial)}`, text: 'Device Certificate page' })],
    ]);
    timeline($('#timeline'), await api('GET', `${base}/events?limit=40`));
    const rows = await api('GET', `${base}/telemetry?limit=120`);
    chart($('#chart'), rows);
    const p = rows.length ? rows[0].payload : null;
    facts($('#latest'), p ? [
      ['Reading', timeEl(rows[0].ts)],
      ['Mode', p.mode],
      ['Load', p.load_pct !== undefined ? `${p.load_pct} %` : null],
      ['Battery', p.battery ? [p.battery.charge_pct !== undefined && `${p.battery.charge_pct} %`, p.battery.runtime_min !== undefined && `${p.battery.runtime_min} min`, p.battery.voltage !== undefined && `${p.battery.voltage} V`, p.battery.temperature_c !== undefined && `${p.battery.temperature_c} °C`].filter(Boolean).join(' · ') : null],
      ['Input', p.input ? `${p.input.voltage ?? '—'} V, ${p.input.frequency_hz ?? '—'} Hz` : null],
      ['Output', p.output ? `${p.output.voltage ?? '—'} V, ${p.output.frequency_hz ?? '—'} Hz, ${p.output.current_a ?? '—'} A` : null],
      ['Alarms', Array.isArray(p.alarms) ? (p.alarms.length ? p.alarms.join(', ') : 'none') : null],
    ] : []);
    if (slow++ % 5 === 0) {
      const windows = await Promise.all(['24h', '7d', '30d'].map((w) => api('GET', `${base}/availability?window=${w}`)));
      facts($('#availability'), windows.map((a) => [`Last ${a.window}`, `${a.uptime_pct.toFixed(1)} % online`]));
    }
  };
  for (const button of document.querySelectorAll('[data-command]')) {
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        const res = await api('POST', `${base}/commands`, { name: button.dataset.command });
        $('#cmd-sent').textContent = `${button.textContent}: queued (${res.id.slice(-8)})`;
        await refresh();
      } catch (err) {
        showError(err);
      } finally {
        button.disabled = false;
      }
    });
  }
  poll(refresh, 3000);
};

/** What each command state means to a person. */
const COMMAND_TEXT = {
  queued: 'Waiting for the device',
  delivered: 'Delivered',
  succeeded: 'Succeeded',
  failed: 'Failed',
  expired: 'Expired undelivered',
};

// ---- alarms (CONTRACT §7) and the device timeline (§8) -------------------------------------

/** Alarm codes in words; a device-reported code we do not know is shown with spaces. */
const ALARM_TEXT = {
  on_battery: 'On battery',
  on_bypass: 'On bypass',
  ups_fault: 'UPS fault',
  low_battery: 'Low battery',
  overload: 'Overload',
  device_offline: 'Device offline',
  battery_bad: 'Battery bad',
  input_bad: 'Input power bad',
  output_overload: 'Output overload',
  temperature_bad: 'Temperature out of range',
  charger_failed: 'Charger failed',
  fan_failure: 'Fan failure',
};
const alarmText = (code) => ALARM_TEXT[code] || String(code).replace(/_/g, ' ');
const SEVERITY_TEXT = { critical: 'Critical', warning: 'Warning', info: 'Info' };
const SEVERITY_RANK = { critical: 0, warning: 1, info: 2 };

function severityBadge(severity) {
  return el('span', { class: `badge sev-${severity}`, 'data-severity': severity, text: SEVERITY_TEXT[severity] || severity });
}

/** The Devices list's badge: how many alarms of the device are active, in words. */
function alarmBadge(serial, n) {
  if (!n) return null;
  return el('a', { class: 'badge alarms', href: `/alarms?serial=${encodeURIComponent(serial)}`, 'data-alarms': String(n), text: `${n} active alarm${n === 1 ? '' : 's'}` });
}

/** Why a session ended, in words. */
const DISCONNECT_TEXT = {
  client_disconnect: 'the device disconnected',
  connection_lost: 'the connection was lost',
  keepalive_timeout: 'the device went silent (keep-alive timeout)',
  taken_over: 'a newer connection of the device took over',
  revoked: 'its certificate was revoked',
  server_shutdown: 'the gateway shut down',
  protocol_error: 'an MQTT protocol error',
  ingest_closed: 'the gateway stopped reading',
  certificate_expired: 'its certificate expired',
  abuse: 'too many unreadable messages',
  node_lost: 'its gateway node was lost',
  gateway_restart: 'the gateway restarted',
};

const EVENT_TEXT = {
  registered: 'Registered',
  certificate_issued: 'Certificate issued',
  certificate_revoked: 'Certificate revoked',
  certificate_superseded: 'Certificate replaced',
  connected: 'Connected',
  disconnected: 'Disconnected',
  refused: 'Connection refused',
  alarm_raised: 'Alarm raised',
  alarm_cleared: 'Alarm cleared',
  alarm_acknowledged: 'Alarm acknowledged',
  command: 'Command',
  lease_changed: 'Lease changed',
};

const COMMAND_STEP_TEXT = {
  queued: 'queued',
  delivered: 'delivered to the device',
  succeeded: 'answered: succeeded',
  failed: 'answered: failed',
  expired: 'expired before the device took it',
};

/** One timeline entry's detail as a sentence. */
function eventSentence(kind, d) {
  const at = (node, peer) => [node && `on node ${node}`, peer && `from ${peer}`].filter(Boolean).join(' ');
  switch (kind) {
    case 'registered':
      return `Registered for ${d.company}${d.registered_by ? ` by ${d.registered_by}` : ''}; lease of ${d.lease_months} months from ${d.start_date}.`;
    case 'certificate_issued':
      return `Certificate ${d.certificate_serial} issued.`;
    case 'certificate_superseded':
      return `Certificate ${d.certificate_serial} retired: a newer certificate replaced it.`;
    case 'certificate_revoked':
      return `Certificate ${d.certificate_serial} revoked${d.reason ? ` (${String(d.reason).replace(/_/g, ' ')})` : ''}.`;
    case 'connected':
      return `Connected ${at(d.node_id, d.peer_addr)}.`.replace(' .', '.');
    case 'disconnected':
      return `Disconnected: ${DISCONNECT_TEXT[d.reason] || (d.reason ? String(d.reason).replace(/_/g, ' ') : 'reason not recorded')}${at(d.node_id, d.peer_addr) ? `, ${at(d.node_id, d.peer_addr)}` : ''}.`;
    case 'refused':
      return `Refused: ${REFUSAL_TEXT[d.reason] || d.reason}${d.detail ? ` (${d.detail})` : ''}; ${d.attempts} attempt${d.attempts === 1 ? '' : 's'}${d.peer_addr ? ` from ${d.peer_addr}` : ''}.`;
    case 'alarm_raised':
      return `${alarmText(d.code)} (${(SEVERITY_TEXT[d.severity] || d.severity || '').toLowerCase()}) raised.`;
    case 'alarm_cleared':
      return `${alarmText(d.code)} cleared.`;
    case 'alarm_acknowledged':
      return `${alarmText(d.code)} acknowledged${d.by ? ` by ${d.by}` : ''}.`;
    case 'command':
      return `Command ${d.name} (${String(d.id || '').slice(-8)}) ${COMMAND_STEP_TEXT[d.state] || d.state}${d.state === 'queued' && d.by ? ` by ${d.by}` : ''}.`;
    case 'lease_changed':
      return `Lease extended by ${d.months_added} month${d.months_added === 1 ? '' : 's'} (${d.lease_months} in all): now ends ${String(d.lease_ends_at || '').slice(0, 10)}, was ${String(d.previous_ends_at || '').slice(0, 10)}.`;
    default:
      return JSON.stringify(d);
  }
}

function timeline(table, events) {
  $('#no-timeline').hidden = events.length > 0;
  table.hidden = events.length === 0;
  $('tbody', table).replaceChildren(...events.map((e) => el('tr', { 'data-kind': e.kind },
    el('td', {}, timeEl(e.at, false)),
    el('td', {}, el('strong', { text: EVENT_TEXT[e.kind] || e.kind })),
    el('td', { class: 'detail', text: eventSentence(e.kind, e.detail || {}) }),
  )));
  labelCells(table);
}

pages.alarms = () => {
  const form = $('#alarm-filter');
  const params = new URLSearchParams(location.search);
  form.state.value = ['active', 'cleared', 'all'].includes(params.get('state')) ? params.get('state') : 'active';
  form.serial.value = params.get('serial') || '';
  // Filter values from the URL are kept until the lists hold their option.
  const wanted = { company: params.get('company') || '', code: params.get('code') || '' };
  let all = [];
  let shown = '';

  const options = (select, values, label) => {
    const current = select.value || wanted[select.name];
    select.replaceChildren(el('option', { value: '', text: 'Any' }), ...values.map((v) => el('option', { value: v, text: label(v) })));
    if (values.includes(current)) select.value = current;
  };

  const ackCell = (a) => {
    if (a.acknowledged_at) {
      return el('td', { class: 'ack' }, el('span', { text: `by ${a.acknowledged_by || 'someone'}` }), el('br'), timeEl(a.acknowledged_at));
    }
    if (a.state === 'cleared') return el('td', { class: 'ack muted', text: 'No' });
    return el('td', { class: 'ack' }, el('button', {
      type: 'button', class: 'secondary', 'data-ack': String(a.id),
      'aria-label': `Acknowledge ${alarmText(a.code)} on ${a.serial}`, text: 'Acknowledge',
    }));
  };
  const common = (a) => [
    el('td', {}, severityBadge(a.severity)),
    el('td', {}, el('strong', { text: alarmText(a.code) }), el('br'), el('code', { text: a.code })),
    el('td', {}, el('a', { href: `/devices/${encodeURIComponent(a.serial)}`, text: a.serial })),
    el('td', { text: a.company }),
    el('td', {}, timeEl(a.raised_at)),
  ];

  const render = () => {
    const f = { state: form.state.value, company: form.company.value, code: form.code.value, serial: form.serial.value.trim().toUpperCase() };
    const match = (a) => (!f.company || a.company === f.company) && (!f.code || a.code === f.code) && (!f.serial || a.serial.toUpperCase().includes(f.serial));
    const active = all.filter((a) => a.state === 'active' && match(a))
      .sort((x, y) => (SEVERITY_RANK[x.severity] ?? 9) - (SEVERITY_RANK[y.severity] ?? 9) || Date.parse(y.raised_at) - Date.parse(x.raised_at));
    const cleared = all.filter((a) => a.state === 'cleared' && match(a));
    // Re-drawn only when something changed, so a focused button is not replaced under the user.
    const key = JSON.stringify([f, active, cleared]);
    if (key === shown) return;
    shown = key;
    $('#active-section').hidden = f.state === 'cleared';
    $('#cleared-section').hidden = f.state === 'active';
    $('#no-active').hidden = active.length > 0;
    $('#active-alarms').hidden = active.length === 0;
    $('#active-alarms tbody').replaceChildren(...active.map((a) => el('tr', { 'data-id': String(a.id), 'data-serial': a.serial, 'data-code': a.code, class: a.acknowledged_at ? '' : 'unacked' },
      ...common(a), ackCell(a))));
    labelCells($('#active-alarms'));
    $('#no-cleared').hidden = cleared.length > 0;
    $('#cleared-alarms').hidden = cleared.length === 0;
    $('#cleared-alarms tbody').replaceChildren(...cleared.map((a) => el('tr', { 'data-id': String(a.id), 'data-serial': a.serial, 'data-code': a.code },
      ...common(a), el('td', {}, timeEl(a.cleared_at)), ackCell(a))));
    labelCells($('#cleared-alarms'));
  };

  const refresh = async () => {
    all = await api('GET', '/api/v1/alarms?state=all&limit=1000');
    options(form.company, [...new Set(all.map((a) => a.company).filter(Boolean))].sort(), (v) => v);
    options(form.code, [...new Set(all.map((a) => a.code))].sort(), alarmText);
    const n = all.filter((a) => a.state === 'active').length;
    $('#alarms-updated').textContent = `${n} active · updated ${new Date().toLocaleTimeString()}`;
    $('#form-error').textContent = '';
    render();
  };

  const changed = () => {
    const q = new URLSearchParams();
    if (form.state.value !== 'active') q.set('state', form.state.value);
    for (const k of ['company', 'code']) {
      wanted[k] = form[k].value;
      if (form[k].value) q.set(k, form[k].value);
    }
    if (form.serial.value.trim()) q.set('serial', form.serial.value.trim());
    history.replaceState(null, '', '/alarms' + (q.toString() ? '?' + q : ''));
    render();
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); changed(); });
  form.serial.addEventListener('input', changed);
  for (const s of [form.state, form.company, form.code]) s.addEventListener('change', changed);

  document.addEventListener('click', async (e) => {
    const button = e.target.closest('button[data-ack]');
    if (!button) return;
    button.disabled = true;
    const a = all.find((x) => String(x.id) === button.dataset.ack);
    try {
      await api('POST', `/api/v1/alarms/${encodeURIComponent(button.dataset.ack)}/ack`);
      $('#ack-done').textContent = a ? `${alarmText(a.code)} on ${a.serial} acknowledged.` : 'Acknowledged.';
      await refresh();
    } catch (err) {
      button.disabled = false;
      showError(err.status === 404 ? 'That alarm is no longer there.' : err);
    }
  });
  poll(refresh, 3000);
};

pages.certificates = () => {
  const form = $('#find');
  const params = new URLSearchParams(location.search);
  let device = null;
  api('GET', '/api/v1/devices').then((ds) => $('#serials').replaceChildren(...ds.map((d) => el('option', { value: d.serial })))).catch(() => {});

  const load = async (serial) => {
    $('#form-error').textContent = '';
    $('#issued').hidden = true;
    try {
      device = await api('GET', `/api/v1/devices/${encodeURIComponent(serial)}`);
    } catch (err) {
      $('#cert-device').hidden = true;
      showError(err.status === 404 ? `No device ${serial} that you may see.` : err);
      return;
    }
    history.replaceState(null, '', `/certificates?serial=${encodeURIComponent(device.serial)}`);
    $('#cert-serial').textContent = device.serial;
    const c = device.certificate;
    const older = device.certificates.filter((x) => !x.revoked_at).length - 1;
    facts($('#current'), c ? [
      ['Status', 'valid'],
      ['Serial number', el('code', { text: c.serial_number })],
      ['Valid', `${when(c.not_before)} – ${when(c.not_after)}`],
      ['Fingerprint (SHA-256)', el('code', { text: c.sha256_fingerprint })],
      ['Older still valid', older > 0 ? `${older} (until the device connects with the newest, then revoked)` : null],
      ['Device status', badge(device.status)],
    ] : [['Status', 'No valid certificate: generate one for the device.'], ['Device status', badge(device.status)]]);
    $('#revoke').disabled = !c;
    $('#cert-device').hidden = false;
  };

  const issued = (res, withKey) => {
    const serial = device.serial;
    const pem = res.certificate_pem + (res.certificate_pem.endsWith('\n') ? '' : '\n') + res.ca_pem;
    facts($('#issued-facts'), [
      ['Serial number', el('code', { text: res.serial_number })],
      ['Valid', `${when(res.not_before)} – ${when(res.not_after)}`],
      ['Fingerprint (SHA-256)', el('code', { text: res.sha256_fingerprint })],
    ]);
    $('#key-warning').hidden = !withKey;
    $('#dl-key').hidden = !withKey;
    $('#dl-zip').hidden = !withKey;
    if (withKey) {
      download($('#dl-key'), `${serial}.key`, res.private_key_pem, 'application/x-pem-file');
      download($('#dl-zip'), `${serial}.zip`, zip([[`${serial}.key`, res.private_key_pem], [`${serial}.pem`, pem], ['ca.pem', res.ca_pem]]));
    }
    download($('#dl-pem'), `${serial}.pem`, pem, 'application/x-pem-file');
    $('#broker-host').textContent = document.body.dataset.mqttHost || location.hostname;
    $('#client-id').textContent = serial;
    const box = $('#issued');
    box.hidden = false;
    box.focus();
  };

  const issue = async (button, body) => {
    button.disabled = true;
    $('#form-error').textContent = '';
    try {
      const res = await api('POST', `/api/v1/devices/${encodeURIComponent(device.serial)}/certificate`, body);
      const serial = device.serial;
      await load(serial);
      issued(res, body === undefined);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  };

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (form.serial.value.trim()) load(form.serial.value.trim());
  });
  // Replacing a working certificate starts its retirement: ask first.
  const confirmGenerate = $('#confirm-generate');
  let pendingCsr;
  const askOrIssue = (button, body) => {
    const c = device.certificate;
    if (!c) {
      issue(button, body);
      return;
    }
    pendingCsr = { button, body };
    $('#confirm-generate-serial').textContent = device.serial;
    $('#confirm-generate-old').textContent = c.serial_number;
    const days = device.rotation_overlap_days;
    $('#confirm-generate-days').textContent = days ? `${days} day${days === 1 ? '' : 's'}` : 'a minute (no rotation overlap is configured)';
    confirmGenerate.showModal();
  };
  confirmGenerate.addEventListener('close', () => {
    if (confirmGenerate.returnValue === 'generate' && pendingCsr) issue(pendingCsr.button, pendingCsr.body);
    pendingCsr = undefined;
  });
  $('#generate').addEventListener('click', (e) => askOrIssue(e.currentTarget));
  $('#sign-csr').addEventListener('click', (e) => {
    const csr = $('#csr');
    csr.removeAttribute('aria-invalid');
    if (!csr.value.includes('BEGIN CERTIFICATE REQUEST')) {
      csr.setAttribute('aria-invalid', 'true');
      showError('Paste a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----).');
      return;
    }
    askOrIssue(e.currentTarget, { csr_pem: csr.value });
  });
  const dialog = $('#confirm-revoke');
  $('#revoke').addEventListener('click', () => {
    $('#confirm-serial').textContent = device.serial;
    dialog.showModal();
  });
  dialog.addEventListener('close', async () => {
    if (dialog.returnValue !== 'revoke') return;
    try {
      await api('DELETE', `/api/v1/devices/${encodeURIComponent(device.serial)}/certificate`);
      await load(device.serial);
    } catch (err) {
      showError(err);
    }
  });
  if (params.get('serial')) {
    form.serial.value = params.get('serial');
    load(params.get('serial'));
  }
};

// ---- the map: Web Mercator in "world units" (the whole world is 256 × 256) ------------------

const WORLD = 256;
const project = (lon, lat) => {
  const l = Math.max(Math.min(lat, 85.0511), -85.0511) * Math.PI / 180;
  return [((lon + 180) / 360) * WORLD, (1 - Math.log(Math.tan(l) + 1 / Math.cos(l)) / Math.PI) / 2 * WORLD];
};

/** TopoJSON (quantized, delta-encoded arcs) → one SVG path per country. */
function countryPaths(topo) {
  const [sx, sy] = topo.transform.scale;
  const [tx, ty] = topo.transform.translate;
  const arcs = topo.arcs.map((arc) => {
    let x = 0, y = 0;
    return arc.map(([dx, dy]) => {
      x += dx;
      y += dy;
      return project(x * sx + tx, y * sy + ty);
    });
  });
  const ring = (indices) => {
    const pts = [];
    for (const i of indices) {
      const a = i < 0 ? arcs[~i].slice().reverse() : arcs[i];
      pts.push(...(pts.length ? a.slice(1) : a));
    }
    return 'M' + pts.map(([x, y]) => `${x.toFixed(2)},${y.toFixed(2)}`).join('L') + 'Z';
  };
  return topo.objects.countries.geometries.map((g) => {
    const polys = g.type === 'Polygon' ? [g.arcs] : g.type === 'MultiPolygon' ? g.arcs : [];
    return { name: g.properties && g.properties.name, d: polys.map((p) => p.map(ring).join('')).join('') };
  });
}

pages.map = async () => {
  const svg = $('#map');
  const popup = $('#popup');
  const tileUrl = document.body.dataset.tileUrl;
  let view = { x: 0, y: 20, w: WORLD, h: WORLD * 0.6 };
  let features = [];
  let fitted = false;
  let selected = null;
  // The SVG's rendered size (clientWidth is 0 for SVG elements in some browsers).
  const box = () => svg.getBoundingClientRect();

  const setView = (v) => {
    const aspect = box().height / Math.max(box().width, 1);
    const w = Math.min(Math.max(v.w, 0.02), WORLD * 1.5);
    view = { x: v.x + (v.w - w) / 2, y: v.y + (v.h - w * aspect) / 2, w, h: w * aspect };
    svg.setAttribute('viewBox', `${view.x} ${view.y} ${view.w} ${view.h}`);
    drawMarkers();
    drawTiles();
  };
  const unitsPerPixel = () => view.w / Math.max(box().width, 1);

  const drawTiles = () => {
    if (!tileUrl) return;
    const z = Math.min(19, Math.max(0, Math.ceil(Math.log2(box().width / view.w))));
    const n = 2 ** z, size = WORLD / n;
    const images = [];
    for (let ty = Math.max(0, Math.floor(view.y / size)); ty <= Math.min(n - 1, Math.floor((view.y + view.h) / size)); ty++) {
      for (let tx = Math.floor(view.x / size); tx <= Math.floor((view.x + view.w) / size); tx++) {
        const wx = ((tx % n) + n) % n;
        const href = tileUrl.replace('{z}', z).replace('{x}', wx).replace('{y}', ty);
        images.push(el('image', { href, x: tx * size, y: ty * size, width: size, height: size }));
      }
    }
    $('#tiles').replaceChildren(...images);
  };

  const drawMarkers = () => {
    const r = 7 * unitsPerPixel();
    $('#markers').replaceChildren(...features.map((f) => {
      const [x, y] = project(...f.geometry.coordinates);
      const p = f.properties;
      return el('circle', {
        cx: x, cy: y, r, class: `state-${p.state}${p.serial === selected ? ' selected' : ''}`, 'data-serial': p.serial, tabindex: 0, role: 'button',
        'aria-label': `${p.serial}, ${STATE_TEXT[p.state] || p.state}`,
        onclick: (e) => openPopup(f, e), onkeydown: (e) => { if (e.key === 'Enter' || e.key === ' ') openPopup(f, e); },
      }, el('title', { text: `${p.serial} — ${STATE_TEXT[p.state] || p.state}` }));
    }));
  };

  const openPopup = (f, e) => {
    e.preventDefault();
    const p = f.properties;
    const [x, y] = project(...f.geometry.coordinates);
    const rect = box();
    const parent = svg.parentElement.getBoundingClientRect();
    popup.style.left = `${rect.left - parent.left + (x - view.x) / unitsPerPixel() + 12}px`;
    popup.style.top = `${rect.top - parent.top + (y - view.y) / unitsPerPixel() - 12}px`;
    popup.replaceChildren(
      el('h2', { text: p.serial }),
      el('p', { text: `UPS ${p.ups_model || '—'}` }),
      el('p', {}, badge({ state: p.state })),
      el('p', {}, el('a', { href: `/devices/${encodeURIComponent(p.serial)}`, text: 'Open device page' })),
      el('button', { type: 'button', class: 'secondary', text: 'Close', onclick: () => { popup.hidden = true; selected = null; drawMarkers(); } }),
    );
    popup.setAttribute('data-serial', p.serial);
    selected = p.serial;
    $$('#markers circle').forEach((c) => c.classList.toggle('selected', c.dataset.serial === selected));
    popup.hidden = false;
  };

  const fit = () => {
    if (features.length === 0) return setView({ x: 0, y: 20, w: WORLD, h: WORLD * 0.6 });
    const pts = features.map((f) => project(...f.geometry.coordinates));
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
    const aspect = box().height / Math.max(box().width, 1);
    // At least ~35° of longitude, so a lone device is shown with its region around it.
    const w = Math.max((maxX - minX) * 1.4, ((maxY - minY) / aspect) * 1.4, 24);
    setView({ x: (minX + maxX) / 2 - w / 2, y: (minY + maxY) / 2 - (w * aspect) / 2, w, h: w * aspect });
  };

  const zoom = (factor, cx = view.x + view.w / 2, cy = view.y + view.h / 2) => {
    const w = view.w * factor, h = view.h * factor;
    setView({ x: cx - (cx - view.x) * factor, y: cy - (cy - view.y) * factor, w, h });
  };
  $('#zoom-in').addEventListener('click', () => zoom(0.5));
  $('#zoom-out').addEventListener('click', () => zoom(2));
  $('#zoom-fit').addEventListener('click', fit);
  svg.addEventListener('wheel', (e) => {
    e.preventDefault();
    const b = svg.getBoundingClientRect();
    zoom(e.deltaY > 0 ? 1.25 : 0.8, view.x + ((e.clientX - b.left) / b.width) * view.w, view.y + ((e.clientY - b.top) / b.height) * view.h);
  }, { passive: false });
  let drag = null;
  svg.addEventListener('pointerdown', (e) => {
    if (e.target.tagName === 'circle') return;
    drag = { x: e.clientX, y: e.clientY, view: { ...view } };
    svg.setPointerCapture(e.pointerId);
    svg.classList.add('dragging');
  });
  svg.addEventListener('pointermove', (e) => {
    if (!drag) return;
    const k = drag.view.w / box().width;
    view = { ...drag.view, x: drag.view.x - (e.clientX - drag.x) * k, y: drag.view.y - (e.clientY - drag.y) * k };
    svg.setAttribute('viewBox', `${view.x} ${view.y} ${view.w} ${view.h}`);
    popup.hidden = true;
  });
  svg.addEventListener('pointerup', () => {
    drag = null;
    svg.classList.remove('dragging');
    drawTiles();
  });
  window.addEventListener('resize', () => setView(view));

  const topo = await fetch('/assets/countries-110m.json').then((r) => r.json());
  const land = $('#land');
  land.classList.toggle('over-tiles', Boolean(tileUrl));
  land.replaceChildren(...countryPaths(topo).map((c) => el('path', { d: c.d }, el('title', { text: c.name || '' }))));
  setView(view);

  poll(async () => {
    const [geo, devices] = await Promise.all([api('GET', '/api/v1/locations'), api('GET', '/api/v1/devices')]);
    features = geo.features;
    const located = new Set(features.map((f) => f.properties.serial));
    const missing = devices.filter((d) => !located.has(d.serial));
    $('#unlocated').replaceChildren(...missing.map((d) => el('li', {}, el('a', { href: `/devices/${encodeURIComponent(d.serial)}`, text: d.serial }), ' ', badge(d.status))));
    $('#all-located').hidden = missing.length > 0 || devices.length === 0;
    if (!fitted && features.length) {
      fitted = true;
      fit();
      const wanted = decodeURIComponent(location.hash.slice(1));
      const f = features.find((x) => x.properties.serial === wanted);
      if (f) {
        const [x, y] = project(...f.geometry.coordinates);
        setView({ x: x - view.w / 2, y: y - view.h / 2, w: view.w, h: view.h });
      }
    } else {
      drawMarkers();
    }
  }, 5000);
};

// ---- start ---------------------------------------------------------------------------------

async function start() {
  const page = document.body.dataset.page;
  const isPublic = page === 'login' || page === 'activate';
  for (const a of $$('header nav a')) {
    const path = a.getAttribute('href');
    if (location.pathname === path || (path === '/devices' && location.pathname.startsWith('/devices/'))) a.setAttribute('aria-current', 'page');
  }
  if (isPublic) return pages[page]();
  if (!token()) return toLogin();
  let me;
  try {
    me = await api('GET', '/api/v1/me');
  } catch (err) {
    return showError(err);
  }
  $('#who').textContent = `${me.first_name || me.email} · ${me.role}`;
  $$('[data-roles]').forEach((e) => (e.hidden = !e.dataset.roles.split(' ').includes(me.role)));
  $('#sign-out').addEventListener('click', async () => {
    await api('POST', '/api/v1/auth/logout').catch(() => {});
    localStorage.removeItem(TOKEN_KEY);
    location.assign('/login');
  });
  if (me.must_change_password && page !== 'profile') return location.assign('/profile?required=1');
  return pages[page](me);
}

document.addEventListener('DOMContentLoaded', () => {
  start().catch((err) => showError(err));
});
