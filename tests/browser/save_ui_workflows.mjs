// The UI (drag-and-drop) twin of each API workflow, as the host's own frontend saves it: the page
// loads the API graph with its own loader (what opening an API-format file does), the seed widgets'
// "control after generate" is set to "fixed" so a shipped seed reproduces, and the page's own
// serialisation (what Save writes) is returned, with each node's title width as the page draws it
// (scripts/make_ui_workflows.py sizes and places the nodes).
//
//   node save_ui_workflows.mjs MANIFEST.json
//   manifest: {url, chromium, workflows: [{name, api}], out}  ->  out: {name: {graph, titles}}
import fs from 'node:fs';
import { chromium } from 'playwright-core';

const manifest = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const browser = await chromium.launch({ executablePath: manifest.chromium, headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
try {
  const saved = {};
  for (const { name, api } of manifest.workflows) {
    // A fresh context for each: the page restores the last graph from its storage and keeps image
    // previews by node id, which would resize nodes of the next graph that share an id.
    // The viewport has room to draw every node at full detail: the page sizes a preview only on a
    // node it draws.
    const context = await browser.newContext({ viewport: { width: 6000, height: 4000 } });
    const page = await context.newPage();
    await page.goto(manifest.url.replace(/\/$/, '') + '/');
    await page.waitForFunction(() => window.app?.graph && window.app.canvas, null, { timeout: 120_000 });
    saved[name] = await page.evaluate(async ([graph, fileName]) => {
      await window.app.loadApiJson(graph, fileName);
      for (const node of window.app.graph.nodes) {
        for (const w of node.widgets ?? []) {
          if (w.name === 'control_after_generate') w.value = 'fixed';
        }
      }
      const rects = window.app.graph.nodes.map((n) => n.boundingRect);
      window.app.canvas.ds.scale = 1;
      window.app.canvas.ds.offset = [20 - Math.min(...rects.map((r) => r[0])), 60 - Math.min(...rects.map((r) => r[1]))];
      // image previews (LoadImage) size their node once the picture has loaded
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && window.app.graph.nodes.some((n) => n.type === 'LoadImage' &&
             !(n.imgs?.length && n.imgs.every((i) => i.complete && i.naturalWidth > 0)))) {
        await new Promise((r) => setTimeout(r, 100));
      }
      // ... on a later draw: redraw until no node has changed size for three draws in a row
      const sizes = () => JSON.stringify(window.app.graph.nodes.map((n) => [n.size[0], n.size[1]]));
      for (let last = null, same = 0; same < 3 && Date.now() < deadline + 5_000;) {
        window.app.canvas.draw(true, true);
        await new Promise((r) => setTimeout(r, 100));
        const now = sizes();
        same = now === last ? same + 1 : 0;
        last = now;
      }
      const ctx = window.app.canvas.ctx;
      ctx.font = window.app.canvas.title_text_font;
      const titles = Object.fromEntries(window.app.graph.nodes.map((n) => [n.id, ctx.measureText(n.title).width]));
      return { graph: window.app.graph.serialize(), titles };
    }, [api, `${name}.json`]);
    await context.close();
    console.log(`${name}: ${saved[name].graph.nodes.length} nodes`);
  }
  fs.writeFileSync(manifest.out, JSON.stringify(saved, null, 1) + '\n');
} finally {
  await browser.close();
}
