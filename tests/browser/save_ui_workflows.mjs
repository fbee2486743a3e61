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
  const page = await browser.newPage();
  // No picture is fetched: a LoadImage node grows when its picture arrives, which would make the saved
  // size depend on timing. The layout gives picture nodes their room instead.
  await page.route((url) => url.pathname.endsWith('/view'), (route) => route.abort());
  await page.goto(manifest.url.replace(/\/$/, '') + '/');
  await page.waitForFunction(() => window.app?.graph && window.app.canvas, null, { timeout: 120_000 });
  const saved = {};
  for (const { name, api } of manifest.workflows) {
    saved[name] = await page.evaluate(async ([graph, fileName]) => {
      window.app.clean();  // nothing of the previous graph (outputs and previews are kept by node id)
      window.app.graph.clear();
      await window.app.loadApiJson(graph, fileName);
      for (const node of window.app.graph.nodes) {
        for (const w of node.widgets ?? []) {
          if (w.name === 'control_after_generate') w.value = 'fixed';
        }
      }
      const ctx = window.app.canvas.ctx;
      ctx.font = window.app.canvas.title_text_font;
      const titles = Object.fromEntries(window.app.graph.nodes.map((n) => [n.id, ctx.measureText(n.title).width]));
      return { graph: window.app.graph.serialize(), titles };
    }, [api, `${name}.json`]);
    console.log(`${name}: ${saved[name].graph.nodes.length} nodes`);
  }
  fs.writeFileSync(manifest.out, JSON.stringify(saved, null, 1) + '\n');
} finally {
  await browser.close();
}
