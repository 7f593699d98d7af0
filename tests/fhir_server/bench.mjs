#!/usr/bin/env node
// Measures engine start-up and search-page latency with and without search-parameter narrowing.
//
//   node bench.mjs [sizes...]        (default: 1000 5000)
//
// For each mode (--no-narrow, default) it starts server.mjs, loads N Observations (a third with
// LOINC 751-8, 50 patients) and reports the median of 3 runs for a few typical searches. Totals are
// printed too: they must be identical in both modes (narrowing must not change results).

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';

const sizes = process.argv.slice(2).map(Number).filter(Boolean);
const SIZES = sizes.length ? sizes : [1000, 5000];
const QUERIES = {
  'code|_lastUpdated|_sort, _count=1000': 'Observation?code=http://loinc.org|751-8&_lastUpdated=ge2000-01-01&_sort=_lastUpdated&_count=1000',
  'code|_lastUpdated|_sort, _count=50': 'Observation?code=http://loinc.org|751-8&_lastUpdated=ge2000-01-01&_sort=_lastUpdated&_count=50',
  'patient=Patient/p1, _count=1000': 'Observation?patient=Patient/p1&_count=1000',
  'subject=Patient/p1&code, _count=100': 'Observation?subject=Patient/p1&code=http://loinc.org|751-8&_count=100',
};

async function startServer(extraArgs) {
  const started = performance.now();
  const child = spawn(process.execPath, [new URL('./server.mjs', import.meta.url).pathname, '--port', '0', ...extraArgs], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [line] = await once(createInterface({ input: child.stdout }), 'line');
  return { child, base: line.replace('LISTENING ', ''), startup: (performance.now() - started) / 1000 };
}

async function load(base, n) {
  await fetch(`${base}/$reset`, { method: 'POST' });
  const codes = ['751-8', '26499-4', '6690-2'];
  for (let start = 0; start < n; start += 500) {
    const entry = [];
    for (let i = start; i < Math.min(n, start + 500); i++) {
      const resource = {
        resourceType: 'Observation',
        status: 'final',
        code: { coding: [{ system: 'http://loinc.org', code: codes[i % 3] }] },
        subject: { reference: `Patient/p${i % 50}` },
        effectiveDateTime: new Date(Date.UTC(2024, 0, 1) + i * 60_000).toISOString(),
        valueQuantity: { value: 1.2, unit: '10*3/uL' },
      };
      entry.push({ request: { method: 'POST', url: 'Observation' }, resource });
    }
    const body = JSON.stringify({ resourceType: 'Bundle', type: 'batch', entry });
    const res = await fetch(base, { method: 'POST', headers: { 'content-type': 'application/fhir+json' }, body });
    if (!res.ok) throw new Error(`load failed: ${res.status} ${await res.text()}`);
  }
}

async function timeQuery(base, query) {
  const times = [];
  let total;
  for (let k = 0; k < 3; k++) {
    const t0 = performance.now();
    const bundle = await (await fetch(`${base}/${query}`)).json();
    times.push(performance.now() - t0);
    total = bundle.total;
  }
  return { seconds: times.sort((a, b) => a - b)[1] / 1000, total };
}

for (const [mode, extraArgs] of [['before (--no-narrow)', ['--no-narrow']], ['after (narrowed)', []]]) {
  const { child, base, startup } = await startServer(extraArgs);
  console.log(`\n${mode}: LISTENING after ${startup.toFixed(2)}s`);
  for (const n of SIZES) {
    await load(base, n);
    for (const [name, query] of Object.entries(QUERIES)) {
      const { seconds, total } = await timeQuery(base, query);
      console.log(`  n=${String(n).padEnd(5)} ${name.padEnd(38)} ${seconds.toFixed(3)}s  (total ${total})`);
    }
  }
  child.kill('SIGTERM');
  await once(child, 'exit');
}
