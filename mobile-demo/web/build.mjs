// Builds the web demo into dist/ (not committed): bundles src/js with
// MQTT.js through esbuild, copies the static files, stamps the service
// worker's cache name with the build, and draws the PNG icons that
// installable web apps need (an SVG is not enough for every platform).
//
//   npm run build

import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { deflateSync } from 'node:zlib';
import * as esbuild from 'esbuild';

const root = dirname(fileURLToPath(import.meta.url));
const src = join(root, 'src');
const dist = join(root, 'dist');

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

await esbuild.build({
  entryPoints: [join(src, 'js', 'app.js')],
  outfile: join(dist, 'app.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: ['es2020'],
  minify: true,
  sourcemap: true,
  logLevel: 'warning',
});

for (const file of ['index.html', 'style.css', 'manifest.webmanifest', 'icon.svg']) {
  copyFileSync(join(src, file), join(dist, file));
}

const build = createHash('sha256')
  .update(readFileSync(join(dist, 'app.js')))
  .update(readFileSync(join(dist, 'style.css')))
  .update(readFileSync(join(dist, 'index.html')))
  .digest('hex')
  .slice(0, 12);
writeFileSync(join(dist, 'sw.js'), readFileSync(join(src, 'sw.js'), 'utf8').replace('__BUILD__', build));

for (const size of [192, 512]) writeFileSync(join(dist, `icon-${size}.png`), icon(size));

console.log(`built dist/ (${build})`);

/** The app icon as a PNG: the brand colour with a white speech bubble,
 *  the same picture as icon.svg, drawn on a 64-unit grid. */
function icon(size) {
  const brand = [0x0f, 0x76, 0x6e];
  const white = [0xff, 0xff, 0xff];
  const rows = [];
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3); // filter byte 0, then RGB
    for (let x = 0; x < size; x++) {
      const u = (x + 0.5) * (64 / size);
      const v = (y + 0.5) * (64 / size);
      const bubble = (u >= 10 && u <= 54 && v >= 18 && v <= 44) || (u >= 20 && u <= 30 && v >= 44 && v <= 52 - (u - 20) * 0.8);
      row.set(bubble ? white : brand, 1 + x * 3);
    }
    rows.push(row);
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(size, 0);
  header.writeUInt32BE(size, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB, no interlace
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', deflateSync(Buffer.concat(rows))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}
