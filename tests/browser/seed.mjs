// The seed workflow through the web pages, in Debian's headless Chromium (playwright-core):
// provider registers a device -> customer activates from the outbox link -> changes the
// temporary password -> generates the certificate and downloads the files -> a device
// connects with them (mosquitto_pub) -> it turns online in the open list without a reload
// -> it appears on the map. Every page gets an axe-core check, a layout check and a 1280x800
// screenshot; the signed-in pages are checked and shot at 390x844 (a phone) too.
//
// Run by tests/web.rs, which starts the gateway and passes: BASE_URL, MQTT_PORT, OUTBOX,
// PROVIDER_EMAIL, PROVIDER_PASSWORD, SCREENSHOTS, WORK.
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { accessible, fits, launch, newPage as open, run, shot, step } from './lib.mjs';

const env = process.env;
const BASE = env.BASE_URL;
const SHOTS = env.SCREENSHOTS;
const WORK = env.WORK;

const SERIAL = 'RE4A000123';
const CUSTOMER = 'ana.ruiz@example.com';
const NEW_PASSWORD = 'correct-horse-battery-9';

const browser = await launch();
const newPage = () => open(browser);

async function signIn(page, email, password) {
  await page.fill('#email', email);
  await page.fill('#password', password);
  await page.click('button[type="submit"]');
}

function outboxMail(to) {
  const files = readdirSync(env.OUTBOX).filter((f) => f.endsWith('.eml')).sort();
  return files.map((f) => readFileSync(join(env.OUTBOX, f), 'utf8')).filter((m) => m.includes(to));
}

function mqttArgs(files, clientId) {
  return ['-h', 'localhost', '-p', env.MQTT_PORT, '--cafile', files.pem, '--cert', files.pem, '--key', files.key, '-i', clientId, '-q', '1'];
}

let device = null;
await run(browser, async () => {
// ---- 1. the provider signs in and registers customer + company + device ---------------------
step('provider signs in');
const provider = await newPage();
await provider.goto(`${BASE}/devices`);
await provider.waitForURL(/\/login\?next=/);
await accessible(provider, 'sign-in');
await shot(provider, '01-sign-in');
await signIn(provider, env.PROVIDER_EMAIL, env.PROVIDER_PASSWORD);
await provider.waitForURL(`${BASE}/devices`);
await provider.locator('#empty').waitFor({ state: 'visible' });

step('provider registers the device (first with a MAC the server rejects)');
await provider.click('a[href="/register"]');
await provider.waitForURL(`${BASE}/register`);
assert.equal(await provider.inputValue('#f-lease'), '12', 'lease defaults to 12 months');
await provider.fill('#f-first', 'Ana');
await provider.fill('#f-last', 'Ruiz');
await provider.fill('#f-email', CUSTOMER);
await provider.fill('#f-phone', '+1 713 555 0100');
await provider.fill('#f-company', 'Acme Hospital');
await provider.fill('#f-so', 'SO-1234');
await provider.fill('#f-serial', SERIAL);
await provider.fill('#f-mac', '01:00:5E:00:00:01'); // well-formed, but multicast: the server says no
await provider.fill('#f-ups-model', '1600XP');
await provider.fill('#f-ups-number', '1600XP-18K');
await provider.fill('#f-ups-serial', '160300007');
await provider.fill('#f-ship', '2025-01-15');
await provider.fill('#f-start', '2026-12-01');
await provider.fill('#f-sc', 'SC-77');
await provider.click('#register-form button[type="submit"]');
const macError = provider.locator('.field-error[data-for="device.mac"]');
await macError.waitFor({ state: 'visible' });
assert.match(await macError.textContent(), /multicast|MAC/i, 'the 422 message is shown next to the MAC field');
assert.equal(await provider.getAttribute('#f-mac', 'aria-invalid'), 'true');
await accessible(provider, 'registration');
await shot(provider, '02-registration-error');
await provider.fill('#f-mac', '00-1B-2C-3D-4E-5F');
await provider.click('#register-form button[type="submit"]');
await provider.locator('#registered').waitFor({ state: 'visible' });
const confirmation = await provider.textContent('#registered');
assert.ok(confirmation.includes(SERIAL) && confirmation.includes(CUSTOMER), confirmation);
assert.match(confirmation, /Activation link and temporary password sent/);
await accessible(provider, 'registration done');
await shot(provider, '03-registration-done');

// ---- 2. the customer activates, signs in, changes the temporary password ---------------------
step('customer activates from the outbox link');
const mails = outboxMail(CUSTOMER);
const link = mails.map((m) => m.match(/https?:\/\/\S+\/activate\?token=[\w-]+/)).find(Boolean);
const temporary = mails.map((m) => m.match(/^Temporary password: (\S+)\s*$/m)).find(Boolean);
assert.ok(link, `activation link in the outbox: ${mails.length} mails to ${CUSTOMER}`);
assert.ok(temporary, 'temporary password in the outbox');
const customer = await newPage();
await customer.goto(link[0]);
assert.equal(new URL(customer.url()).search, '', 'the token leaves the address bar');
await accessible(customer, 'activation');
await shot(customer, '04-activation');
await customer.click('#activate');
await customer.locator('#activate-done').waitFor({ state: 'visible' });
await customer.click('#activate-done a');
await customer.waitForURL(/\/login\?activated=1/);
await customer.locator('#login-notice').waitFor({ state: 'visible' });

step('customer signs in with the temporary password and must change it');
await signIn(customer, CUSTOMER, temporary[1]);
await customer.waitForURL(/\/profile\?required=1/);
await customer.locator('#password-required').waitFor({ state: 'visible' });
await customer.goto(`${BASE}/devices`); // any other page sends the customer back
await customer.waitForURL(/\/profile\?required=1/);
await customer.locator('#password-required').waitFor({ state: 'visible' });
await accessible(customer, 'profile');
await shot(customer, '05-profile-password');
await customer.fill('#current_password', temporary[1]);
await customer.fill('#new_password', NEW_PASSWORD);
await customer.fill('#confirm_password', NEW_PASSWORD);
await customer.click('#password-form button[type="submit"]');
await customer.waitForURL(`${BASE}/devices`);
const row = customer.locator(`tr[data-serial="${SERIAL}"]`);
await row.locator('[data-state="never_connected"]').waitFor();

// ---- 3. Generate Certificate and download the files ------------------------------------------
step('customer generates the certificate and downloads .key, .pem and .zip');
await customer.click('a[href="/certificates"]');
await customer.fill('#serial', SERIAL);
await customer.click('#find button[type="submit"]');
await customer.locator('#cert-device').waitFor({ state: 'visible' });
await customer.click('#generate');
await customer.locator('#issued').waitFor({ state: 'visible' });
assert.match(await customer.textContent('#key-warning'), /shown only now/);
assert.match(await customer.textContent('#issued'), /MQTT key[\s\S]*MQTT CA[\s\S]*8883/);
const files = {};
for (const [id, ext] of [['#dl-key', 'key'], ['#dl-pem', 'pem'], ['#dl-zip', 'zip']]) {
  const [download] = await Promise.all([customer.waitForEvent('download'), customer.click(id)]);
  assert.equal(download.suggestedFilename(), `${SERIAL}.${ext}`);
  files[ext] = join(WORK, `${SERIAL}.${ext}`);
  await download.saveAs(files[ext]);
}
assert.match(readFileSync(files.key, 'utf8'), /^-----BEGIN (EC )?PRIVATE KEY-----/);
assert.equal((readFileSync(files.pem, 'utf8').match(/BEGIN CERTIFICATE/g) || []).length, 2, '.pem = device certificate + CA');
const listing = spawnSync('python3', ['-m', 'zipfile', '-l', files.zip], { encoding: 'utf8' });
assert.equal(listing.status, 0, `the zip opens: ${listing.stderr}`);
for (const name of [`${SERIAL}.key`, `${SERIAL}.pem`, 'ca.pem']) assert.ok(listing.stdout.includes(name), listing.stdout);
await accessible(customer, 'certificate');
await fits(customer, 'certificate at 1280x800');
await shot(customer, '06-certificate');

// ---- 4. the device connects; the open list turns it green without a reload -------------------
step('device connects with the downloaded files; the open list updates by itself');
await customer.goto(`${BASE}/devices`);
await row.locator('[data-state="never_connected"]').waitFor();
let navigations = 0;
customer.on('framenavigated', (f) => { if (f === customer.mainFrame()) navigations++; });
const wrong = spawnSync('mosquitto_pub', [...mqttArgs(files, `${SERIAL}-typo`), '-t', `tms/${SERIAL}/status`, '-m', 'online'], { encoding: 'utf8', timeout: 10000 });
assert.notEqual(wrong.status, 0, 'a client id other than the certificate CN is refused');
const located = spawnSync('mosquitto_pub', [...mqttArgs(files, SERIAL), '-t', `tms/${SERIAL}/location`, '-m', '{"lat":29.7604,"lon":-95.3698,"accuracy_m":15}'], { encoding: 'utf8', timeout: 10000 });
assert.equal(located.status, 0, `location published: ${located.stderr}`);
device = spawn('mosquitto_pub', [...mqttArgs(files, SERIAL), '-k', '30', '-l', '-t', `tms/${SERIAL}/telemetry`], { stdio: ['pipe', 'inherit', 'inherit'] });
const telemetry = (load, charge, ago) => JSON.stringify({ ts: Date.now() - ago * 1000, mode: 'online', load_pct: load, battery: { charge_pct: charge, runtime_min: 42, voltage: 54.2, temperature_c: 24 }, input: { voltage: 230, frequency_hz: 50 }, output: { voltage: 230, frequency_hz: 50, current_a: 6.1 }, alarms: [] });
for (const [load, charge, ago] of [[31, 100, 120], [36, 99, 60], [34, 98, 0]]) device.stdin.write(telemetry(load, charge, ago) + '\n');
device.stdin.write('{"load_pct": "very high"}\n'); // malformed: shown under Rejected payloads
await row.locator('[data-state="online"]').waitFor({ timeout: 20000 });
assert.equal(navigations, 0, 'the list turned green without a reload');
assert.deepEqual(await customer.locator('#devices tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.serial)), [SERIAL], 'the list shows only this customer\'s device');
await accessible(customer, 'devices');
await fits(customer, 'devices at 1280x800');
await shot(customer, '07-devices');

// ---- 5. the map, the popup, the device page ---------------------------------------------------
step('device shows on the map');
await customer.click('a[href="/map"]');
const marker = customer.locator(`#markers circle[data-serial="${SERIAL}"]`);
await marker.waitFor();
assert.equal(await marker.getAttribute('class'), 'state-online');
assert.ok((await customer.locator('#land path').count()) > 100, 'the offline base layer is drawn');
await marker.click();
await customer.locator('#popup').waitFor({ state: 'visible' });
const popup = await customer.textContent('#popup');
assert.ok(popup.includes(SERIAL) && popup.includes('1600XP') && popup.includes('Online'), popup);
assert.equal(await customer.locator('#markers circle').count(), 1, 'one marker: the other company\'s located device is not on this map');
assert.ok(!(await customer.content()).includes(env.FOREIGN), 'nothing of the other company in the page');
await accessible(customer, 'map');
await fits(customer, 'map at 1280x800');
await shot(customer, '08-map');

step('device page: status, refused attempts, telemetry');
await customer.click('#popup a');
await customer.waitForURL(`${BASE}/devices/${SERIAL}`);
await customer.locator('#status [data-state="online"]').waitFor();
await customer.locator('#refusals tr[data-reason="client_id_mismatch"]').waitFor();
await customer.locator('#chart polyline.load').waitFor();
assert.match(await customer.textContent('#latest'), /34 %/);
assert.match(await customer.textContent('#location'), /29\.76040, -95\.36980/);
await customer.locator('#quarantine tbody tr').waitFor();
assert.match(await customer.textContent('#quarantine'), /load_pct must be a number.*very high.*25 bytes/s, 'the rejected payload with its reason');
step('device page: send the device a self-test');
await customer.click('#cmd-self_test');
await customer.locator('#commands tbody tr[data-state]').first().waitFor();
assert.match(await customer.textContent('#commands'), /self_test/, 'the command is listed');
assert.match(await customer.textContent('#cmd-sent'), /queued/, 'the page says it was queued');
assert.ok(await customer.locator('#cmd-report_now').isEnabled(), 'report now can be sent too');
await accessible(customer, 'device');
await fits(customer, 'device at 1280x800');
assert.ok(
  await customer.locator('#refusals').evaluate((t) => t.parentElement.scrollWidth <= t.parentElement.clientWidth + 1),
  'the refused-attempts table fits its card at 1280x800: Detail and Last attempt are on screen',
);
await shot(customer, '09-device');

step('the same pages on a phone (390x844)');
await customer.setViewportSize({ width: 390, height: 844 });
for (const [path, name, ready] of [
  ['/devices', 'devices', `tr[data-serial="${SERIAL}"] [data-state]`],
  [`/devices/${SERIAL}`, 'device', '#status [data-state]'],
  ['/map', 'map', `#markers circle[data-serial="${SERIAL}"]`],
  [`/certificates?serial=${SERIAL}`, 'certificate', '#cert-device'],
  ['/profile', 'profile', '#password-form'],
]) {
  await customer.goto(`${BASE}${path}`);
  await customer.locator(ready).first().waitFor();
  await fits(customer, `${name} at 390x844`);
  await accessible(customer, `${name} at 390x844`);
  await shot(customer, `phone-${name}`);
}
const brand = await customer.locator('header .brand').boundingBox();
const links = await customer.locator('header nav').boundingBox();
assert.ok(links.y >= brand.y + brand.height - 1, 'on a phone the links go below the title, not beside it');
await customer.goto(`${BASE}/devices`);
const status = await customer.locator(`tr[data-serial="${SERIAL}"] [data-state]`).boundingBox();
assert.ok(status.x + status.width <= 390, `the Status column is on the screen (ends at ${status.x + status.width}px)`);
const search = await customer.locator('#q').boundingBox();
assert.ok(search.x + search.width <= 390, 'the search box fits the screen');
await customer.setViewportSize({ width: 1280, height: 800 });

// ---- 6. revoke with confirmation: the device is cut off --------------------------------------
step('customer revokes the certificate; the device goes offline');
await customer.goto(`${BASE}/certificates?serial=${SERIAL}`);
await customer.locator('#cert-device').waitFor({ state: 'visible' });
await customer.click('#revoke');
await customer.locator('#confirm-revoke').waitFor({ state: 'visible' });
await accessible(customer, 'revoke dialog');
await shot(customer, '10-revoke-confirm');
await customer.click('#confirm-yes');
await customer.waitForFunction(() => document.querySelector('#current').textContent.includes('No valid certificate'));
await customer.goto(`${BASE}/devices/${SERIAL}`);
await customer.locator('#status [data-state="offline"]').waitFor({ timeout: 10000 });
device.kill();

// ---- 7. the provider still sees the device; nobody signed out sees anything --------------------
step('the provider sees the device; a signed-out visitor is sent to sign in');
await provider.goto(`${BASE}/devices`);
await provider.locator(`tr[data-serial="${SERIAL}"]`).waitFor();
assert.equal(await provider.locator(`tr[data-serial="${env.FOREIGN}"]`).count(), 0, 'the provider sees only the devices it registered');
step('another company\'s device cannot be opened by URL');
await customer.goto(`${BASE}/devices/${env.FOREIGN}`);
await customer.waitForFunction((s) => document.querySelector('#form-error').textContent.includes(`No device ${s}`), env.FOREIGN);
assert.ok(await customer.locator('#device').isHidden());
await customer.goto(`${BASE}/certificates?serial=${env.FOREIGN}`);
await customer.waitForFunction((s) => document.querySelector('#form-error').textContent.includes(`No device ${s}`), env.FOREIGN);
assert.ok(await customer.locator('#cert-device').isHidden());
const stranger = await newPage();
await stranger.goto(`${BASE}/devices/${SERIAL}`);
await stranger.waitForURL(/\/login\?next=%2Fdevices%2FRE4A000123/);

}, () => device && device.kill());
console.log(`ok: seed workflow passed; screenshots in ${SHOTS}`);
assert.ok(existsSync(join(SHOTS, '09-device.png')));
