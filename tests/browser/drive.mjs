// Drive the host's own ComfyUI frontend in Debian's headless Chromium, as a user would.
//
//   node drive.mjs MANIFEST.json
//
// The manifest (written by tests/test_frontend.py) names the host's URL, the browser, the UI
// workflow files to drop with the pack's node types each holds, broken copies that must be
// reported, and where to write the results and the README screenshot. One browser session:
//   1. shipped workflows are dropped and photographed (the README's screenshots, the template
//      thumbnails when asked);
//   1b. the template browser lists the pack's workflows with their thumbnails; one is opened
//      from it, set to the test's size and steps, and run;
//   2. each workflow file reaches the page through a real drop event on the canvas; the driver
//      asserts that no dialog (missing nodes/models, load error) or toast (workflow validation)
//      appeared, and that every node, the pack's included, is a registered type drawn on the
//      canvas holding the file's widget values, each valid for its widget (combo options,
//      number ranges) and each link typed as its slots; it types in the test's settings (size,
//      steps) by node title and widget name; then it clicks Run and waits until the
//      host's /history has finished the prompt the page posted and the page's SaveImage node
//      shows that very file;
//   3. each broken copy is dropped and must fail one of those checks (it is not queued).
// Any failure exits 1 with the reason; on success the results (prompt ids, shown images,
// reports on the broken copies) go to manifest.results.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const manifest = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const base = manifest.url.replace(/\/$/, '');
const timeout = manifest.timeout_ms ?? 300_000;
const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const results = { workflows: {}, console_errors: [] };

class Failure extends Error {}
const fail = (msg) => { throw new Failure(msg); };

// -- the page's state, read in the page ---------------------------------------------------------
// Visible dialogs (PrimeVue .p-dialog / role=dialog) and toasts: the missing-nodes dialog ("This
// workflow has missing nodes"), the missing-models dialog, the load-error dialog, the workflow
// validation alerts and the prompt-error dialog are all one of these.
function popupsInPage() {
  const visible = (e) => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const text = (e) => e.innerText.replace(/\s+/g, ' ').trim().slice(0, 400);
  return {
    dialogs: [...document.querySelectorAll('.p-dialog, [role="dialog"], [role="alertdialog"]')]
      .filter(visible).map(text),
    toasts: [...document.querySelectorAll('.p-toast-message')].filter(visible).map(text),
  };
}

// Every node of the graph as the page holds it: registered type or a missing-node placeholder,
// its widgets with their options, whether the last frame drew it.
function graphInPage() {
  const app = window.app;
  const canvas = app.canvas;
  const drawn = new Set((canvas.visible_nodes || []).map((n) => n.id));
  const serialized = app.graph.serialize();
  const saved = new Map(serialized.nodes.map((n) => [String(n.id), n.widgets_values ?? []]));
  const links = app.graph.links instanceof Map ? [...app.graph.links.values()] : Object.values(app.graph.links ?? {});
  const slotType = (id, kind, slot) => app.graph.getNodeById(id)?.[kind]?.[slot]?.type;
  const linkTypes = new Map();
  for (const l of links) {
    for (const [id, kind, slot] of [[l.origin_id, 'outputs', l.origin_slot], [l.target_id, 'inputs', l.target_slot]]) {
      if (!linkTypes.has(String(id))) linkTypes.set(String(id), []);
      linkTypes.get(String(id)).push({ link: l.id, type: l.type, from: slotType(l.origin_id, 'outputs', l.origin_slot),
        to: slotType(l.target_id, 'inputs', l.target_slot) });
    }
  }
  return app.graph.nodes.map((node) => ({
    links: linkTypes.get(String(node.id)) ?? [],
    id: node.id,
    type: node.type,
    title: node.title,
    registered: !!LiteGraph.registered_node_types[node.type] &&
      node.constructor === LiteGraph.registered_node_types[node.type],
    has_errors: !!node.has_errors,
    drawn: drawn.has(node.id),
    size: [node.size[0], node.size[1]],
    widgets_values: saved.get(String(node.id)),
    widgets: (node.widgets || []).map((w) => ({
      name: w.name,
      type: w.type,
      value: typeof w.value === 'object' ? null : w.value,
      values: Array.isArray(w.options?.values) ? w.options.values : null,
      min: w.options?.min,
      max: w.options?.max,
    })),
  }));
}

// -- steps -----------------------------------------------------------------------------------------
async function settle(page) {
  // two animation frames (the canvas redraws), then a short quiet period for late dialogs/toasts
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.waitForTimeout(600);
}

async function assertNoPopups(page, when) {
  const { dialogs, toasts } = await page.evaluate(popupsInPage);
  const known = /missing node|missing model|missing custom|invalid|validation|error|failed/i;
  const problems = [
    ...dialogs.map((t) => `dialog${known.test(t) ? ' (missing node/model or invalid value)' : ''}: ${t}`),
    ...toasts.map((t) => `toast: ${t}`),
  ];
  if (problems.length) fail(`${when}: the page shows\n  ${problems.join('\n  ')}`);
}

// The user's way: a file dragged from the desktop onto the canvas. The DataTransfer holds a File
// of the JSON; dragenter/dragover/drop go to the canvas element and bubble to the frontend's
// document drop handler, which loads it through app.handleFile like any dropped file.
async function dropFile(page, file) {
  const text = fs.readFileSync(file, 'utf8');
  const name = path.basename(file);
  const dataTransfer = await page.evaluateHandle(([t, n]) => {
    const dt = new DataTransfer();
    dt.items.add(new File([t], n, { type: 'application/json' }));
    return dt;
  }, [text, name]);
  const canvas = page.locator('#graph-canvas');
  // onto empty canvas, not onto a node of the graph shown now
  const at = await page.evaluate(() => {
    const c = window.app.canvas;
    const r = c.canvas.getBoundingClientRect();
    for (const fy of [0.5, 0.85, 0.15, 0.3, 0.7]) {
      for (const fx of [0.5, 0.3, 0.7, 0.15, 0.85]) {
        const [x, y] = c.ds.convertOffsetToCanvas([fx * r.width, fy * r.height]);
        if (!window.app.graph.getNodeOnPos(x, y)) return { clientX: r.left + fx * r.width, clientY: r.top + fy * r.height };
      }
    }
    return { clientX: r.left + r.width / 2, clientY: r.top + r.height / 2 };
  });
  for (const type of ['dragenter', 'dragover', 'drop']) {
    await canvas.dispatchEvent(type, { dataTransfer, ...at });
  }
  await dataTransfer.dispose();
  return JSON.parse(text);
}

async function waitForGraph(page, wf, name) {
  const want = wf.nodes.map((n) => `${n.id}:${n.type}`).sort();
  try {
    await page.waitForFunction((w) => {
      const have = window.app.graph.nodes.map((n) => `${n.id}:${n.type}`).sort();
      return have.length === w.length && have.every((x, i) => x === w[i]);
    }, want, { timeout: 30_000 });
  } catch {
    const have = await page.evaluate(() => window.app.graph.nodes.map((n) => `${n.id}:${n.type}`));
    fail(`${name}: the dropped workflow did not load; the page's graph has ${JSON.stringify(have)}`);
  }
}

// Fit the whole graph into the view the user's way (the "." key on the canvas), then redraw.
async function fitView(page) {
  await page.locator('#graph-canvas').focus();
  await page.keyboard.press('.');
  await page.evaluate(() => window.app.graph.setDirtyCanvas(true, true));
  await settle(page);
}

function checkNodes(name, wf, nodes, packTypes) {
  const problems = [];
  const byId = new Map(nodes.map((n) => [String(n.id), n]));  // newer frontends keep ids as strings
  for (const fileNode of wf.nodes) {
    const n = byId.get(String(fileNode.id));
    const where = `node ${fileNode.id} (${fileNode.type})`;
    if (!n.registered) problems.push(`${where} is not a registered node type (missing node placeholder)`);
    if (n.has_errors) problems.push(`${where} is marked with errors`);
    if (!n.drawn) problems.push(`${where} was not drawn on the canvas`);
    if (!(n.size[0] > 0 && n.size[1] > 0)) problems.push(`${where} has no size`);
    const expected = JSON.stringify(fileNode.widgets_values ?? []);
    if (JSON.stringify(n.widgets_values) !== expected) {
      problems.push(`${where}: the page holds widget values ${JSON.stringify(n.widgets_values)}, the file ${expected}`);
    }
    for (const l of n.links) {
      const types = new Set([l.type, l.from, l.to].filter((t) => t !== '*'));
      if (types.size !== 1) problems.push(`${where}: link ${l.link} is typed ${l.type}, from ${l.from} to ${l.to}`);
    }
    for (const w of n.widgets) {
      if (w.values && w.value !== null && !w.values.includes(w.value)) {
        problems.push(`${where} widget ${w.name}: ${JSON.stringify(w.value)} is not one of its options`);
      }
      if (w.type === 'number' && typeof w.value !== 'number') {
        problems.push(`${where} widget ${w.name}: a number widget holding ${JSON.stringify(w.value)}`);
      }
      if (typeof w.value === 'number' && ((w.min != null && w.value < w.min) || (w.max != null && w.value > w.max))) {
        problems.push(`${where} widget ${w.name}: ${w.value} outside [${w.min}, ${w.max}]`);
      }
    }
  }
  for (const type of packTypes) {
    if (!nodes.some((n) => n.type === type && n.registered && n.drawn)) {
      problems.push(`pack node ${type} is not rendered`);
    }
  }
  if (problems.length) fail(`${name}:\n  ${problems.join('\n  ')}`);
}

async function history(promptId) {
  const r = await fetch(`${base}/api/history/${promptId}`);
  return (await r.json())[promptId];
}

// Click Run; the page posts the prompt itself. Then wait until the host has finished it and the
// page shows each SaveImage's output (the node's loaded <img>, whose src names the saved file).
async function queueAndWait(page, name, spec) {
  const posted = page.waitForResponse((r) => r.url().endsWith('/api/prompt') && r.request().method() === 'POST',
    { timeout: 30_000 });
  await page.locator('[data-testid="queue-button"]').click();
  const response = await posted;
  const body = await response.json().catch(() => ({}));
  if (response.status() !== 200 || !body.prompt_id || Object.keys(body.node_errors ?? {}).length) {
    fail(`${name}: the host refused the page's prompt (${response.status()}): ${JSON.stringify(body).slice(0, 2000)}`);
  }
  const promptId = body.prompt_id;
  log(`${name}: queued from the page as ${promptId}`);

  let entry;
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    entry = await history(promptId);
    if (entry?.status?.completed || entry?.status?.status_str === 'error') break;
    await page.waitForTimeout(250);
  }
  if (!entry?.status?.completed) {
    fail(`${name}: prompt ${promptId} did not complete: ${JSON.stringify(entry?.status ?? 'not in /history').slice(0, 3000)}`);
  }
  const shown = {};
  for (const saver of spec.savers) {
    const images = entry.outputs?.[String(saver)]?.images ?? [];
    if (!images.length) fail(`${name}: /history has no image for SaveImage ${saver}: ${JSON.stringify(entry.outputs)}`);
    try {
      shown[saver] = await page.waitForFunction(([id, filename]) => {
        const node = window.app.graph.nodes.find((n) => String(n.id) === String(id));
        const img = node?.imgs?.find((i) => i.complete && i.naturalWidth > 0 &&
          new URL(i.src).searchParams.get('filename') === filename);
        return img ? img.src : null;
      }, [saver, images[0].filename], { timeout: 60_000 }).then((h) => h.jsonValue());
    } catch {
      const imgs = await page.evaluate((id) => (window.app.graph.nodes.find((n) => String(n.id) === String(id))?.imgs || [])
        .map((i) => i.src), saver);
      fail(`${name}: the host saved ${images[0].filename}, the page's SaveImage ${saver} shows ${JSON.stringify(imgs)}`);
    }
    log(`${name}: SaveImage ${saver} shows ${shown[saver]}`);
  }
  return { prompt_id: promptId, shown };
}

// The test's settings ({node title: {widget name: value}}), typed into the named widgets as a user
// would; a title or widget the page does not have is a failure, not a silent skip.
async function typeSettings(page, name, settings) {
  const missing = await page.evaluate((values) => {
    const missing = [];
    for (const [title, widgets] of Object.entries(values)) {
      const node = window.app.graph.nodes.find((n) => n.title === title);
      for (const [widgetName, value] of Object.entries(widgets)) {
        const w = node?.widgets?.find((x) => x.name === widgetName);
        if (!w) { missing.push(`${title}.${widgetName}`); continue; }
        w.value = value;
        w.callback?.(value);
      }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return missing;
  }, settings ?? {});
  if (missing.length) fail(`${name}: the page has no widget ${missing.join(', ')} to set`);
  await settle(page);
}

// Drop one workflow file and check what the page made of it.
async function dropAndCheck(page, spec) {
  const wf = await dropFile(page, spec.file);
  await waitForGraph(page, wf, spec.name);
  await fitView(page);
  await assertNoPopups(page, `${spec.name} dropped`);
  const nodes = await page.evaluate(graphInPage);
  checkNodes(spec.name, wf, nodes, spec.pack_types);
  log(`${spec.name}: ${nodes.length} nodes drawn, pack nodes ${spec.pack_types.join(', ')}`);
  await typeSettings(page, spec.name, spec.settings);
}

// Dismiss dialogs the way a user does (Escape) and close toasts with their close buttons.
async function closePopups(page) {
  for (let i = 0; i < 5; i++) {
    const { dialogs, toasts } = await page.evaluate(popupsInPage);
    if (!dialogs.length && !toasts.length) return;
    if (dialogs.length) await page.keyboard.press('Escape');
    for (const button of await page.locator('.p-toast-message .p-toast-close-button').all()) {
      await button.click().catch(() => {});
    }
    await settle(page);
  }
  fail(`could not close ${JSON.stringify(await page.evaluate(popupsInPage))}`);
}

// The README's screenshots: shipped workflows (not the test copies) as a user sees them
// after dropping it and fitting the view. Three of the user's display settings make it legible:
// full node detail at any zoom (Settings > Zoom Node Level of Detail = 0), no minimap, no fps info.
async function screenshot(page, shot) {
  await page.evaluate(async () => {
    const settings = window.app.extensionManager.setting;
    await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
    await settings.set('Comfy.Minimap.Visible', false);
    await settings.set('Comfy.Graph.CanvasInfo', false);
  });
  const wf = await dropFile(page, shot.file);
  await waitForGraph(page, wf, `${shot.label} (shipped)`);
  await fitView(page);
  // "." leaves a quarter of the view empty; zoom in so the graph fills the width beside the sidebar
  await page.evaluate(() => {
    const rects = window.app.graph.nodes.map((n) => n.boundingRect);
    const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
    const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
    // a margin above for the titles of the top row, clear of the floating Run bar
    window.app.canvas.ds.fitToBounds([x0 - 20, y0 - 110, x1 - x0 + 40, y1 - y0 + 130], { zoom: 0.9 });
    window.app.graph.setDirtyCanvas(true, true);
  });
  await page.mouse.move(shot.width - 5, shot.height / 2);  // no hover highlight
  await settle(page);
  await assertNoPopups(page, `the shipped ${shot.label} dropped`);
  const nodes = await page.evaluate(graphInPage);
  checkNodes(`${shot.label} (shipped)`, wf, nodes.map((n) => ({ ...n, widgets: [] })), []);
  await page.screenshot({ path: shot.out });
  log(`screenshot ${shot.out}`);
}

// The template browser: the user's way to the pack's workflows. The Templates button opens the
// dialog; the pack is listed under its folder name with the extensions; each of its workflows is a
// card showing the pack's own thumbnail. The chosen card loads the workflow; the test's settings (a
// small size and few steps, typed into the widgets as a user would) are set, and it runs.
async function openTemplate(page, spec) {
  const thumbnailResponses = new Map();  // cards in view from the start fetch theirs at once
  page.on('response', (r) => {
    const p = new URL(r.url()).pathname;
    if (p.startsWith(`/api/workflow_templates/${spec.module}/`)) thumbnailResponses.set(p, r);
  });
  await page.getByRole('button', { name: 'Templates' }).first().click();
  const dialog = page.locator('[role="dialog"]').filter({ hasText: spec.module });
  await dialog.waitFor({ state: 'visible', timeout: 30_000 });
  await dialog.getByText(spec.module, { exact: true }).first().click();
  // The frontend fetches each card's picture when the card scrolls into view and shows it as a blob:
  // the host's answers for the pack's thumbnail URLs are what prove each card has its own.
  const problems = [];
  for (const name of spec.names) {
    const card = dialog.locator(`[data-testid="template-workflow-${name}"]`);
    try {
      await card.waitFor({ state: 'attached', timeout: 15_000 });
    } catch {
      problems.push(`no card for ${name}`);
      continue;
    }
    if (!spec.check_thumbnails) continue;  // being made in this run
    const want = `/api/workflow_templates/${spec.module}/${name}.jpg`;
    const fetched = page.waitForResponse((r) => new URL(r.url()).pathname === want, { timeout: 20_000 })
      .catch(() => null);
    await card.scrollIntoViewIfNeeded();
    const response = thumbnailResponses.get(want) ?? await fetched;
    if (!response || response.status() !== 200 || !/image\/jpeg/.test(response.headers()['content-type'] ?? '')) {
      problems.push(`${name}: the host answered ${response ? `${response.status()} ${response.headers()['content-type']}` : 'nothing'} for ${want}`);
      continue;
    }
    try {
      await page.waitForFunction((testid) => {
        const img = document.querySelector(`[data-testid="${testid}"] img`);
        return img && img.complete && img.naturalWidth > 0 && !/default-template/.test(img.src);
      }, `template-workflow-${name}`, { timeout: 15_000 });
    } catch {
      const src = await card.locator('img').first().getAttribute('src').catch(() => null);
      problems.push(`${name}: the card shows ${src}, not the pack's thumbnail`);
    }
  }
  if (problems.length) fail(`template browser:\n  ${problems.join('\n  ')}`);
  log(`template browser: ${spec.names.length} cards under ${spec.module}, each with its thumbnail`);

  const wf = JSON.parse(fs.readFileSync(spec.file, 'utf8'));
  await dialog.locator(`[data-testid="template-workflow-${spec.name}"]`).click();
  await waitForGraph(page, wf, `${spec.name} (template)`);
  await fitView(page);
  await assertNoPopups(page, `${spec.name} opened from the template browser`);
  const nodes = await page.evaluate(graphInPage);
  checkNodes(`${spec.name} (template)`, wf, nodes, spec.pack_types);
  await typeSettings(page, `${spec.name} (template)`, spec.settings);
  const result = await queueAndWait(page, `${spec.name} (template)`, spec);
  await assertNoPopups(page, `${spec.name} (template) after its run`);
  return result;
}

// -- main ----------------------------------------------------------------------------------------
async function main() {
  // A returning user: no first-run template browser (a setting) and no "Nodes 2.0" banner
  // (dismissed, in the page's localStorage).
  const settings = await fetch(`${base}/api/settings`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ 'Comfy.TutorialCompleted': true }),
  });
  if (!settings.ok) fail(`POST /api/settings answered ${settings.status}`);

  fs.rmSync(manifest.profile, { recursive: true, force: true });
  const { width, height } = manifest.viewport;
  const context = await chromium.launchPersistentContext(manifest.profile, {
    executablePath: manifest.chromium,
    headless: true,
    viewport: { width, height },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  try {
    await context.addInitScript(() => localStorage.setItem('vueNodesBannerDismissed', 'true'));
    const page = context.pages()[0] ?? await context.newPage();
    page.setDefaultTimeout(60_000);
    page.on('pageerror', (e) => { results.console_errors.push(`pageerror: ${e.message}`); log('page error:', e.message); });
    page.on('console', (m) => {
      if (m.type() === 'error' && !/ERR_NAME_NOT_RESOLVED|ERR_INTERNET_DISCONNECTED|status of 404/.test(m.text())) {
        results.console_errors.push(m.text().slice(0, 500));
      }
    });

    await page.goto(base + '/');
    await page.waitForFunction(() => window.app?.graph && window.app.canvas && document.querySelector('#graph-canvas'),
      null, { timeout: 120_000 });
    await page.locator('[data-testid="queue-button"]').waitFor({ state: 'visible' });
    await settle(page);
    log(`frontend ${await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__)} up`);
    await assertNoPopups(page, 'the page as it opens');

    for (const shot of manifest.screenshots) await screenshot(page, shot);
    if (manifest.template) results.template = await openTemplate(page, manifest.template);

    for (const spec of manifest.workflows) {
      await dropAndCheck(page, spec);
      // what the frontend's "Export (API)" writes for this graph: the same graphToPrompt call
      const exported = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
      const ran = spec.run === false ? {} : await queueAndWait(page, spec.name, spec);
      results.workflows[spec.name] = { ...ran, exported };
      await assertNoPopups(page, `${spec.name} after its run`);
    }

    // The checks can fail: each broken copy must be reported (and is not queued).
    results.broken = {};
    for (const spec of manifest.broken ?? []) {
      try {
        await dropAndCheck(page, spec);
        results.broken[spec.name] = null;
      } catch (e) {
        if (!(e instanceof Failure)) throw e;
        results.broken[spec.name] = e.message;
      }
      log(`broken ${spec.name}: ${results.broken[spec.name] ? 'reported' : 'NOT reported'}`);
      await closePopups(page);
    }
  } finally {
    await context.close();
  }
}

try {
  await main();
  fs.writeFileSync(manifest.results, JSON.stringify(results, null, 1));
  log('all workflows loaded, ran and showed their images');
} catch (e) {
  console.error(e instanceof Failure ? `FAILED: ${e.message}` : e.stack || String(e));
  if (results.console_errors.length) console.error('browser console errors:\n  ' + results.console_errors.join('\n  '));
  process.exit(1);
}
