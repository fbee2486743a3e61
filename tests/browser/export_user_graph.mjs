// A graph as a user makes it in the real frontend and exports it with Export (API):
// the shipped zero_shot.json dropped in, an upscaler with a second Save Image and a Preview Image
// added after the decode, then app.graphToPrompt() (what Export (API) writes), numeric ids and all.
//
//   node export_user_graph.mjs URL CHROMIUM UI_WORKFLOW OUT.json
import fs from 'node:fs';
import { chromium } from 'playwright-core';

const [base, executablePath, uiFile, out] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath, headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
try {
  const page = await browser.newPage();
  await page.goto(base.replace(/\/$/, '') + '/');
  await page.waitForFunction(() => window.app?.graph && window.app.canvas, null, { timeout: 120_000 });
  const exported = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf);
    const graph = window.app.graph;
    const decode = graph.nodes.find((n) => n.type === 'VAEDecode');
    const add = (type, pos) => {
      const node = LiteGraph.createNode(type);
      node.pos = pos;
      graph.add(node);
      return node;
    };
    const upscale = add('ImageScaleBy', [decode.pos[0], decode.pos[1] + 200]);
    upscale.widgets.find((w) => w.name === 'upscale_method').value = 'nearest-exact';
    upscale.widgets.find((w) => w.name === 'scale_by').value = 2.0;
    decode.connect(0, upscale, 0);
    const save2 = add('SaveImage', [upscale.pos[0] + 300, upscale.pos[1]]);
    save2.widgets.find((w) => w.name === 'filename_prefix').value = 'upscaled';
    upscale.connect(0, save2, 0);
    const preview = add('PreviewImage', [decode.pos[0], decode.pos[1] + 400]);
    decode.connect(0, preview, 0);
    return (await window.app.graphToPrompt()).output;
  }, JSON.parse(fs.readFileSync(uiFile, 'utf8')));
  fs.writeFileSync(out, JSON.stringify(exported, null, 1) + '\n');
  console.log(`wrote ${out}: ${Object.keys(exported).length} nodes`);
} finally {
  await browser.close();
}
