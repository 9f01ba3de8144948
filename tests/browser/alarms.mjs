// The Alarms page, the alarm badge on the Devices list and the device timeline, in Debian's
// headless Chromium (playwright-core). tests/web.rs makes the alarms exist first: Ana's device
// (Acme Hospital) reported on battery with a bad battery, Bob's device (Globex) an overload.
// Ana sees her two alarms, most severe first, with severity in words; acknowledges one in the
// page; filters by alarm and by state; sees the badge and the timeline. Bob, of another
// company, signs in and sees only his own alarm. Every page: axe-core and the layout check at
// 1280x800 and 390x844.
//
// Run by tests/web.rs with BASE_URL, SCREENSHOTS, ANA_EMAIL, BOB_EMAIL, PASSWORD, SERIAL
// (Ana's device) and FOREIGN (Bob's device).
import assert from 'node:assert/strict';
import { accessible, fits, launch, newPage, run, shot, step } from './lib.mjs';

const env = process.env;
const BASE = env.BASE_URL;
const SERIAL = env.SERIAL;
const FOREIGN = env.FOREIGN;

const browser = await launch();

async function signIn(page, email) {
  await page.goto(`${BASE}/alarms`);
  await page.waitForURL(/\/login\?next=%2Falarms/);
  await page.fill('#email', email);
  await page.fill('#password', env.PASSWORD);
  await page.click('button[type="submit"]');
  await page.waitForURL(`${BASE}/alarms`);
}

/** Checks a page at the phone size, then goes back to 1280x800. */
async function onPhone(page, name, ready) {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.locator(ready).first().waitFor();
  await fits(page, `${name} at 390x844`);
  await accessible(page, `${name} at 390x844`);
  await shot(page, `phone-${name}`);
  await page.setViewportSize({ width: 1280, height: 800 });
}

await run(browser, async () => {
  step('Ana signs in and opens the Alarms page from the header');
  const ana = await newPage(browser);
  await signIn(ana, env.ANA_EMAIL);
  const rows = ana.locator('#active-alarms tbody tr');
  await ana.locator(`#active-alarms tr[data-serial="${SERIAL}"][data-code="on_battery"]`).waitFor();
  await ana.locator(`#active-alarms tr[data-serial="${SERIAL}"][data-code="battery_bad"]`).waitFor();
  assert.equal(await rows.count(), 2, 'two active alarms: on battery and battery bad');
  assert.equal(await ana.getAttribute('header nav a[href="/alarms"]', 'aria-current'), 'page', 'the Alarms link is in the header');
  const onBattery = ana.locator('#active-alarms tr[data-code="on_battery"]');
  assert.match(await onBattery.textContent(), /Critical.*On battery.*Acme Hospital/s, 'severity and alarm in words, and the company');
  assert.ok(await ana.locator('#cleared-section').isHidden(), 'cleared alarms are not shown by default');
  assert.ok(!(await ana.content()).includes(FOREIGN), 'nothing of the other company in the page');
  await accessible(ana, 'alarms');
  await fits(ana, 'alarms at 1280x800');
  await shot(ana, '12-alarms');
  await onPhone(ana, 'alarms', '#active-alarms tr[data-code="on_battery"] button[data-ack]');

  step('Ana acknowledges the on-battery alarm');
  await onBattery.locator('button[data-ack]').click();
  await ana.waitForFunction(() => /by ana@example\.com/.test(document.querySelector('#active-alarms tr[data-code="on_battery"] td.ack')?.textContent || ''));
  assert.match(await ana.textContent('#ack-done'), /On battery on .* acknowledged/);
  assert.equal(await rows.count(), 2, 'acknowledging does not clear');
  assert.equal(await ana.locator('#active-alarms tr[data-code="battery_bad"] button[data-ack]').count(), 1, 'the other alarm still waits for someone');

  step('Ana filters by alarm, by company and by state');
  assert.deepEqual(await ana.locator('#a-company option').evaluateAll((o) => o.map((x) => x.textContent)), ['Any', 'Acme Hospital'], 'only her company to choose from');
  await ana.selectOption('#a-code', 'battery_bad');
  await ana.waitForFunction(() => document.querySelectorAll('#active-alarms tbody tr').length === 1);
  assert.equal(await rows.first().getAttribute('data-code'), 'battery_bad');
  assert.match(ana.url(), /code=battery_bad/, 'the filter is in the address, to share or reload');
  await ana.selectOption('#a-code', '');
  await ana.selectOption('#a-company', 'Acme Hospital');
  await ana.waitForFunction(() => document.querySelectorAll('#active-alarms tbody tr').length === 2);
  await ana.selectOption('#a-state', 'cleared');
  await ana.locator('#no-cleared').waitFor({ state: 'visible' });
  assert.ok(await ana.locator('#active-section').isHidden(), 'only cleared alarms are listed');
  await ana.selectOption('#a-state', 'all');
  await ana.locator('#active-section').waitFor({ state: 'visible' });
  await ana.locator('#cleared-section').waitFor({ state: 'visible' });

  step('the Devices list shows the badge');
  await ana.click('header nav a[href="/devices"]');
  const badge = ana.locator(`tr[data-serial="${SERIAL}"] [data-alarms]`);
  await badge.waitFor();
  assert.equal(await badge.textContent(), '2 active alarms', 'the count in words, not colour only');
  await fits(ana, 'devices with alarms at 1280x800');
  await accessible(ana, 'devices with alarms');
  await onPhone(ana, 'devices-alarms', `tr[data-serial="${SERIAL}"] [data-alarms]`);

  step('the device page shows the timeline');
  await ana.click(`tr[data-serial="${SERIAL}"] a[href="/devices/${SERIAL}"]`);
  const raised = ana.locator('#timeline tr[data-kind="alarm_raised"]');
  await raised.first().waitFor();
  assert.match(await ana.textContent('#timeline'), /Alarm raised\s*On battery \(critical\) raised\./, 'the raise in words');
  await ana.locator('#timeline tr[data-kind="alarm_acknowledged"]').waitFor();
  assert.match(await ana.textContent('#timeline tr[data-kind="alarm_acknowledged"]'), /On battery acknowledged by ana@example\.com/);
  assert.match(await ana.textContent('#timeline tr[data-kind="connected"]'), /Connected on node \S+ from \S+/, 'the node and peer of the session');
  assert.match(await ana.textContent('#timeline tr[data-kind="registered"]'), /Registered for Acme Hospital by provider@example\.com/);
  const kinds = await ana.locator('#timeline tbody tr').evaluateAll((r) => r.map((x) => x.dataset.kind));
  assert.equal(kinds[kinds.length - 1], 'registered', `newest first, the registration last: ${kinds}`);
  await accessible(ana, 'device timeline');
  await fits(ana, 'device timeline at 1280x800');
  await shot(ana, '13-device-timeline');
  await onPhone(ana, 'device-timeline', '#timeline tr[data-kind="alarm_raised"]');

  step('Bob, of another company, sees only his own alarm');
  const bob = await newPage(browser);
  await signIn(bob, env.BOB_EMAIL);
  await bob.locator(`#active-alarms tr[data-serial="${FOREIGN}"][data-code="overload"]`).waitFor();
  await bob.selectOption('#a-state', 'all');
  await bob.locator('#cleared-section').waitFor({ state: 'visible' });
  assert.deepEqual(await bob.locator('#active-alarms tbody tr, #cleared-alarms tbody tr').evaluateAll((r) => r.map((x) => x.dataset.serial)), [FOREIGN]);
  assert.ok(!(await bob.content()).includes(SERIAL), `nothing of ${SERIAL} in Bob's page`);
  assert.ok(!(await bob.content()).includes('Acme Hospital'), 'nor its company among the filters');
});
console.log('ok: alarms pages passed');
