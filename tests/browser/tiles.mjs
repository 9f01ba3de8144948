// The map with a tile server configured (http.map_tile_url): tiles are requested from it and
// drawn beneath the built-in outlines, the Content-Security-Policy lets exactly that origin
// through, and the device's marker is still there. Run by tests/web.rs with BASE_URL, TOKEN,
// SERIAL and TILE_ORIGIN.
import assert from 'node:assert/strict';
import { accessible, launch, newPage, run, shot, step } from './lib.mjs';

const env = process.env;
const browser = await launch();
await run(browser, async () => {
  step('map with a tile server');
  const page = await newPage(browser);
  await page.goto(`${env.BASE_URL}/login`);
  await page.evaluate((t) => localStorage.setItem('tms.token', t), env.TOKEN);
  const firstTile = page.waitForResponse((r) => r.url().startsWith(`${env.TILE_ORIGIN}/tiles/`) && r.status() === 200);
  await page.goto(`${env.BASE_URL}/map`);
  await page.locator(`#markers circle[data-serial="${env.SERIAL}"]`).waitFor();
  await firstTile;
  const images = await page.locator('#tiles image').count();
  assert.ok(images > 0, 'tile images in the map');
  assert.equal(await page.getAttribute('#land', 'class'), 'over-tiles', 'outlines drawn without fill over the tiles');
  await accessible(page, 'map with tiles');
  await shot(page, '11-map-tiles');
});
console.log('ok: tiles drawn');
