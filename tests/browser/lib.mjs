// What the browser tests share: Debian's Chromium launched the way this machine needs, pages
// that record script errors and CSP refusals, the axe-core check and screenshots.
import { chromium } from 'playwright-core';
import { readFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');

/** Everything that went wrong without throwing: reported (and failed on) at the end. */
export const problems = [];
export const step = (s) => console.log(`-- ${s}`);

export async function launch() {
  mkdirSync(process.env.SCREENSHOTS, { recursive: true });
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

export async function newPage(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on('pageerror', (e) => problems.push(`page error on ${page.url()}: ${e.message}`));
  page.on('console', (m) => {
    // Failed API calls (a 422 we provoke) are logged by Chromium as resource errors; anything
    // else at error level — a script exception, a Content-Security-Policy refusal — is a bug.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(`console on ${page.url()}: ${m.text()}`);
  });
  return page;
}

/** axe-core in the page: WCAG 2.1 A/AA and best practices; every violation is a failure. */
export async function accessible(page, name) {
  await page.evaluate(AXE);
  const result = await page.evaluate(() => window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] }));
  for (const v of result.violations) {
    problems.push(`axe ${name}: ${v.id} (${v.impact}) ${v.help}: ${v.nodes.map((n) => n.target.join(' ')).slice(0, 3).join(', ')}`);
  }
  console.log(`   axe ${name}: ${result.passes.length} rules pass, ${result.violations.length} violations`);
}

/**
 * The page fits its viewport: nothing scrolls sideways except inside a .table-wrap, no card or
 * header runs past the right edge, and no card's content is wider than the card.
 */
export async function fits(page, name) {
  const bad = await page.evaluate(() => {
    const out = [];
    const vw = document.documentElement.clientWidth;
    const width = document.documentElement.scrollWidth;
    if (width > vw + 1) out.push(`the page is ${width}px wide in a ${vw}px viewport`);
    for (const el of document.querySelectorAll('header.top, main .card, main .table-wrap, main form')) {
      if (el.offsetParent === null) continue;
      const what = `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}${el.className ? '.' + el.className.split(' ').join('.') : ''}`;
      const right = el.getBoundingClientRect().right;
      if (right > vw + 1) out.push(`${what} ends at ${Math.round(right)}px`);
      if (!el.classList.contains('table-wrap') && el.scrollWidth > el.clientWidth + 1) out.push(`content overflows ${what} by ${el.scrollWidth - el.clientWidth}px`);
    }
    return out;
  });
  for (const b of bad) problems.push(`layout ${name}: ${b}`);
  console.log(`   layout ${name}: ${bad.length ? bad.length + ' problems' : 'fits'}`);
}

export async function shot(page, name) {
  await page.screenshot({ path: join(process.env.SCREENSHOTS, `${name}.png`) });
}

/** Runs the test body, then closes the browser and exits non-zero on any problem. */
export async function run(browser, body, cleanup = () => {}) {
  try {
    await body();
  } catch (err) {
    problems.push(`failed: ${err.stack || err}`);
  } finally {
    cleanup();
    await browser.close();
  }
  if (problems.length) {
    console.error(problems.join('\n'));
    process.exit(1);
  }
}
