'use strict';
// A NormService client written against protos/ alone, in another language than
// the server, that checks what the proto promises against a running server.
//
//   node contract.js CONFIG.json
//
// CONFIG.json (written by test_contract.py):
//   {"target": "127.0.0.1:PORT",
//    "limits": {"max_tensor_elements": N, "max_layers_per_request": N},
//    "auth": {"target": "127.0.0.1:PORT", "admin": TOKEN, "reader": TOKEN}}   (optional)
//
// Only protos/normsvc/v1/*.proto describe the service.  The standard services
// (grpc.health.v1, server reflection) and the google.rpc error details are
// public, stable schemas declared inline below, field numbers only.  Prints
// one line per check and closes with "N passed, M failed"; exits 1 on a failure.

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILES = fs.readdirSync(path.join(PROTOS, 'normsvc', 'v1'))
  .filter((f) => f.endsWith('.proto')).sort().map((f) => `normsvc/v1/${f}`);
const SERVICE = 'normsvc.v1.NormService';
const DOMAIN = 'normsvc';
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

// --- the service, from protos/ ------------------------------------------------

const packageDefinition = protoLoader.loadSync(PROTO_FILES, {
  includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
});
const NormService = grpc.loadPackageDefinition(packageDefinition).normsvc.v1.NormService;

// The same files through protobufjs, for field paths, comments and the served descriptors.
const root = new protobuf.Root();
root.resolvePath = (origin, target) => (path.isAbsolute(target) ? target : path.join(PROTOS, target));
root.loadSync(PROTO_FILES, { keepCase: true, alternateCommentMode: true });
root.resolveAll();
const serviceType = root.lookupService(SERVICE);

// --- public schemas the checks decode (field numbers as published by Google and gRPC) ------

const side = new protobuf.Root();
protobuf.parse(`syntax = "proto3"; package google.protobuf;
  message Any { string type_url = 1; bytes value = 2; }`, side, { keepCase: true });
protobuf.parse(`syntax = "proto3"; package google.rpc;
  message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; string reason = 3; }
    repeated FieldViolation field_violations = 1;
  }
  message ResourceInfo { string resource_type = 1; string resource_name = 2; string owner = 3; string description = 4; }
  message PreconditionFailure {
    message Violation { string type = 1; string subject = 2; string description = 3; }
    repeated Violation violations = 1;
  }
  message QuotaFailure {
    message Violation { string subject = 1; string description = 2; }
    repeated Violation violations = 1;
  }`, side, { keepCase: true });
protobuf.parse(`syntax = "proto3"; package grpc.health.v1;
  message HealthCheckRequest { string service = 1; }
  message HealthCheckResponse {
    enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
    ServingStatus status = 1;
  }`, side, { keepCase: true });
// grpc.reflection.v1 and v1alpha declare the same messages; one schema serves both.
protobuf.parse(`syntax = "proto3"; package reflection;
  message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
  message ServerReflectionRequest {
    string host = 1;
    oneof message_request {
      string file_by_filename = 3;
      string file_containing_symbol = 4;
      ExtensionRequest file_containing_extension = 5;
      string all_extension_numbers_of_type = 6;
      string list_services = 7;
    }
  }
  message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
  message ServiceResponse { string name = 1; }
  message ListServiceResponse { repeated ServiceResponse service = 1; }
  message ErrorResponse { int32 error_code = 1; string error_message = 2; }
  message ServerReflectionResponse {
    string valid_host = 1;
    ServerReflectionRequest original_request = 2;
    oneof message_response {
      FileDescriptorResponse file_descriptor_response = 4;
      ListServiceResponse list_services_response = 6;
      ErrorResponse error_response = 7;
    }
  }`, side, { keepCase: true });
side.resolveAll();
const T = (name) => side.lookupType(name);

// --- reporting ------------------------------------------------------------------

let passed = 0;
let failed = 0;

function check(name, ok, why) {
  if (ok) {
    passed += 1;
    console.log(`ok      ${name}`);
  } else {
    failed += 1;
    console.log(`FAILED  ${name}${why === undefined ? '' : `: ${why}`}`);
  }
  return Boolean(ok);
}

async function section(name, fn) {
  console.log(`# ${name}`);
  try {
    await fn();
  } catch (e) {
    check(`${name}: ran to the end`, false, e && e.stack ? e.stack : String(e));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const show = (v) => JSON.stringify(v, (k, x) => (Buffer.isBuffer(x) ? `<${x.length} bytes>` : x));
const close = (a, b, tol = 1e-9) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) <= tol * Math.max(1, Math.abs(b[i])));
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// --- tensors ----------------------------------------------------------------------

const DTYPE_SIZE = { DTYPE_FLOAT16: 2, DTYPE_FLOAT32: 4, DTYPE_FLOAT64: 8 };

function toHalf(v) {
  const f = new Float32Array([v]);
  const x = new Uint32Array(f.buffer)[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = ((x >>> 23) & 0xff) - 127 + 15;
  const mant = x & 0x7fffff;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00;
  return sign | (exp << 10) | Math.round(mant / 8192);
}

function fromHalf(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (mant / 1024);
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + mant / 1024);
}

function tensor(values, shape, dtype = 'DTYPE_FLOAT64') {
  const size = DTYPE_SIZE[dtype];
  const data = Buffer.alloc(values.length * size);
  values.forEach((v, i) => {
    if (size === 8) data.writeDoubleLE(v, i * 8);
    else if (size === 4) data.writeFloatLE(v, i * 4);
    else data.writeUInt16LE(toHalf(v), i * 2);
  });
  return { dtype, shape: shape === undefined ? [values.length] : shape, data };
}

function read(t) {
  if (!t) return null;
  const shape = (t.shape || []).map(Number);
  const size = DTYPE_SIZE[t.dtype];
  const data = t.data || Buffer.alloc(0);
  const n = shape.reduce((a, b) => a * b, 1);
  if (!size || data.length !== n * size) return { shape, dtype: t.dtype, values: null };
  const values = [];
  for (let i = 0; i < n; i++) {
    values.push(size === 8 ? data.readDoubleLE(i * 8) : size === 4 ? data.readFloatLE(i * 4) : fromHalf(data.readUInt16LE(i * 2)));
  }
  return { shape, dtype: t.dtype, values };
}

const moments = (count, mean, variance, shape) => ({
  count: tensor([count], []), mean: tensor(mean, shape), variance: tensor(variance, shape),
});
const num = (v) => (v === undefined || v === null ? 0 : Number(v));

// --- calls --------------------------------------------------------------------------

function metadataWith(token) {
  const md = new grpc.Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  return md;
}

function unary(client, method, request, { token, timeoutMs = 30000 } = {}) {
  const started = Date.now();
  return new Promise((resolve) => {
    client[method](request, metadataWith(token), { deadline: Date.now() + timeoutMs }, (err, value) => {
      resolve(err ? { err, ms: Date.now() - started } : { value, ms: Date.now() - started });
    });
  });
}

// Reads a server stream until `count` messages, its end, an error, or `timeoutMs`; then cancels it.
function collect(call, { count = Infinity, timeoutMs = 10000 } = {}) {
  return new Promise((resolve) => {
    const messages = [];
    let done = false;
    const finish = (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (!err) call.cancel();
      resolve({ messages, err });
    };
    const timer = setTimeout(() => finish(null), timeoutMs);
    call.on('data', (m) => {
      messages.push(m);
      if (messages.length >= count) finish(null);
    });
    call.on('error', (err) => finish(err.code === grpc.status.CANCELLED && done ? null : err));
    call.on('end', () => finish(null));
  });
}

function rawUnary(client, method, bytes, { token, timeoutMs = 30000 } = {}) {
  return new Promise((resolve) => {
    client.makeUnaryRequest(method, (b) => b, (b) => b, bytes, metadataWith(token),
      { deadline: Date.now() + timeoutMs }, (err, value) => resolve(err ? { err } : { value }));
  });
}

function rawServerStream(client, method, bytes, { token, timeoutMs = 10000 } = {}) {
  const call = client.makeServerStreamRequest(method, (b) => b, (b) => b, bytes, metadataWith(token),
    { deadline: Date.now() + timeoutMs });
  return collect(call, { timeoutMs });
}

function rawBidi(client, method, messages, { token, timeoutMs = 10000 } = {}) {
  const call = client.makeBidiStreamRequest(method, (b) => b, (b) => b, metadataWith(token),
    { deadline: Date.now() + timeoutMs });
  const result = collect(call, { timeoutMs });
  for (const m of messages) call.write(m);
  call.end();
  return result;
}

// Messages of the standard services, as a generic client sends them.
function typedUnary(client, method, reqType, resType, request, opts = {}) {
  const enc = (o) => Buffer.from(T(reqType).encode(T(reqType).fromObject(o)).finish());
  return new Promise((resolve) => {
    client.makeUnaryRequest(method, enc, (b) => T(resType).toObject(T(resType).decode(b), { enums: String }),
      request, metadataWith(opts.token), { deadline: Date.now() + 10000 },
      (err, value) => resolve(err ? { err } : { value }));
  });
}

function reflect(client, version, request, opts = {}) {
  const method = `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`;
  const req = T('reflection.ServerReflectionRequest');
  const res = T('reflection.ServerReflectionResponse');
  const call = client.makeBidiStreamRequest(method, (o) => Buffer.from(req.encode(req.fromObject(o)).finish()),
    (b) => res.toObject(res.decode(b), { oneofs: true }), metadataWith(opts.token), { deadline: Date.now() + 10000 });
  const result = collect(call, { count: 1, timeoutMs: 10000 });
  call.write(request);
  call.end();
  return result.then(({ messages, err }) => (err ? { err } : { value: messages[0] }));
}

// --- error details ---------------------------------------------------------------------

function decodeDetails(err) {
  const bins = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bins.length) return null;
  const status = T('google.rpc.Status').decode(bins[0]);
  const out = { code: status.code, message: status.message, types: [] };
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    out.types.push(name);
    let type = null;
    try {
      type = side.lookupType(name);
    } catch (e) {
      continue;
    }
    out[name.replace('google.rpc.', '')] = type.toObject(type.decode(any.value), { defaults: true });
  }
  return out;
}

// What no message to a gRPC caller may show: server paths, Python reprs and tracebacks,
// the in-process API's method names, grpc's own internal wording.
const INTERNALS = [
  [/\/tmp\/|\/var\/folders\/|normsvc-(?:import|export)-/, 'a server file path'],
  [/\{'|': '|<[a-zA-Z_.]+ object at 0x/, 'a Python repr'],
  [/Traceback|File "/, 'a Python traceback'],
  [/\b(?:create_layer|update_many|import_|export_stats|import_stats|list_layers|delete_layer)\b/, 'a Python method name'],
  [/Exception (?:de)?serializing/, "grpc's internal error text"],
];

function leaks(message) {
  const hit = INTERNALS.find(([re]) => re.test(message || ''));
  return hit ? hit[1] : null;
}

// A BadRequest field path names a field of the request message: `updates[0].moments.mean`.
function resolvePath(typeName, fieldPath, request) {
  if (!fieldPath) return 'the field path is empty';
  let type = root.lookupType(typeName);
  let value = request;
  const parts = fieldPath.split('.');
  for (let i = 0; i < parts.length; i++) {
    const m = /^([a-z_][a-z0-9_]*)(?:\[(\d+)\])?$/.exec(parts[i]);
    if (!m) return `"${parts[i]}" is not a field name (with an optional [index])`;
    const field = type.fields[m[1]];
    if (!field) return `${type.fullName.slice(1)} has no field "${m[1]}"`;
    field.resolve();
    if (m[2] !== undefined) {
      if (!field.repeated) return `${m[1]} is not repeated: no [${m[2]}]`;
      if (value !== undefined && value !== null) {
        const items = value[m[1]] || [];
        if (Number(m[2]) >= items.length) return `${m[1]}[${m[2]}]: the request has ${items.length} elements`;
        value = items[Number(m[2])];
      }
    } else {
      if (field.repeated && i < parts.length - 1) return `${m[1]} is repeated: expected an [index]`;
      value = value === undefined || value === null ? undefined : value[m[1]];
    }
    if (i < parts.length - 1) {
      if (!(field.resolvedType instanceof protobuf.Type)) return `${m[1]} is not a message`;
      type = field.resolvedType;
    }
  }
  return null;
}

// The details every normsvc error carries, by code (the proto's "Errors" section).
const DETAIL_BY_CODE = {
  [grpc.status.INVALID_ARGUMENT]: 'BadRequest',
  [grpc.status.NOT_FOUND]: 'ResourceInfo',
  [grpc.status.FAILED_PRECONDITION]: 'PreconditionFailure',
  [grpc.status.RESOURCE_EXHAUSTED]: 'QuotaFailure',
};

// Checks that `res` failed with `code`, and what the proto promises of its status.
// opts: type (request message name, for field paths), request, field (expected path),
// layer (expected layer), reason (expected ErrorInfo reason), resource (expect ResourceInfo).
function expectError(name, res, code, opts = {}) {
  const err = res.err;
  const got = err ? `${CODE_NAMES[err.code]}: ${err.details}` : `succeeded with ${show(res.value)}`.slice(0, 300);
  if (!check(`${name} -> ${CODE_NAMES[code]}`, err && err.code === code, got)) return null;
  check(`${name}: message says what was wrong`, typeof err.details === 'string' && err.details.length >= 10,
    `message ${show(err.details)}`);
  const leak = leaks(err.details);
  check(`${name}: message shows no server internals`, !leak, `${leak} in ${show(err.details)}`);
  const d = decodeDetails(err);
  if (!check(`${name}: google.rpc.Status in grpc-status-details-bin`, d && d.code === code && d.message === err.details,
    d ? `status code ${d.code}, message ${show(d.message)}` : 'no details')) return null;
  const info = d.ErrorInfo;
  check(`${name}: ErrorInfo(domain "${DOMAIN}", UPPER_SNAKE reason)`,
    info && info.domain === DOMAIN && /^[A-Z][A-Z0-9_]*$/.test(info.reason), show(d.types.concat([info])));
  if (opts.reason !== undefined && info) {
    check(`${name}: ErrorInfo.reason ${opts.reason}`, info.reason === opts.reason, info.reason);
  }
  if (opts.layer !== undefined && info) {
    check(`${name}: ErrorInfo.metadata.layer names the layer`, info.metadata.layer === opts.layer,
      show(info.metadata));
  }
  const want = DETAIL_BY_CODE[code];
  const malformed = info && info.reason === 'MALFORMED_REQUEST';  // BadRequest only when a field is to blame
  if (want && (code !== grpc.status.NOT_FOUND || opts.layer !== undefined) && !(malformed && !d[want])) {
    check(`${name}: carries ${want}`, d[want] !== undefined, `details: ${d.types.join(', ')}`);
  }
  if ((code === grpc.status.NOT_FOUND || opts.resource) && opts.layer !== undefined && d.ResourceInfo) {
    check(`${name}: ResourceInfo names the layer`,
      d.ResourceInfo.resource_type === 'normsvc.v1.Layer' && d.ResourceInfo.resource_name === opts.layer,
      show(d.ResourceInfo));
  }
  if (code === grpc.status.INVALID_ARGUMENT && d.BadRequest) {
    const fields = d.BadRequest.field_violations.map((v) => v.field);
    if (opts.type) {
      const bad = fields.map((f) => [f, resolvePath(opts.type, f, opts.request)]).filter(([, why]) => why);
      check(`${name}: BadRequest field paths name fields of ${opts.type}`, fields.length && !bad.length,
        fields.length ? bad.map(([f, why]) => `${show(f)}: ${why}`).join('; ') : 'no field violations');
    }
    if (opts.field !== undefined) {
      check(`${name}: BadRequest field is ${opts.field}`, fields.some((f) => f === opts.field || f.startsWith(`${opts.field}.`)),
        show(fields));
    }
  }
  return d;
}

function expectOk(name, res) {
  check(`${name} -> OK`, !res.err, res.err ? `${CODE_NAMES[res.err.code]}: ${res.err.details}` : '');
  return res.err ? null : res.value;
}

// --- the checks ------------------------------------------------------------------------

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const limits = config.limits || {};
  const credentials = grpc.credentials.createInsecure();
  const stub = new NormService(config.target, credentials);
  const raw = new grpc.Client(config.target, credentials);
  const P = `contract-${process.pid}-${Date.now().toString(36)}/`;
  const call = (method, request, opts) => unary(stub, method, request, opts);
  const create = (name, cfg) => call('CreateLayer', cfg === undefined ? { name } : { name, config: cfg });
  const get = async (name) => {
    const r = await call('GetLayer', { names: [name] });
    if (r.err) throw new Error(`GetLayer ${name}: ${r.err.details}`);
    return r.value.layers[0];
  };
  const mustCreate = async (name, cfg) => {
    const r = await create(name, cfg);
    if (r.err) throw new Error(`CreateLayer ${name}: ${r.err.details}`);
    return r.value.layer;
  };

  await section('the proto documents its choices', async () => {
    for (const e of ['DType', 'LayerKind', 'Convention', 'Naming', 'Mode']) {
      const en = root.lookupEnum(`normsvc.v1.${e}`);
      const zero = Object.keys(en.values).find((k) => en.values[k] === 0);
      check(`${e}.${zero} says what it means`, (en.comments[zero] || '').length > 10, show(en.comments[zero]));
    }
    for (const m of serviceType.methodsArray) {
      check(`rpc ${m.name} is documented`, (m.comment || '').length > 10, show(m.comment));
    }
    const stats = root.lookupType('normsvc.v1.RunningStats');
    check('RunningStats.mean documents the starting values', /start/i.test(stats.fields.mean.comment || ''),
      show(stats.fields.mean.comment));
    const layerName = root.lookupType('normsvc.v1.CreateLayerRequest').fields.name.comment || '';
    check('CreateLayerRequest.name documents the name rules', /256/.test(layerName), show(layerName));
  });

  await section('health', async () => {
    const health = (service) => typedUnary(raw, '/grpc.health.v1.Health/Check', 'grpc.health.v1.HealthCheckRequest',
      'grpc.health.v1.HealthCheckResponse', { service });
    for (const service of ['', SERVICE]) {
      const v = expectOk(`Health.Check(${show(service)})`, await health(service));
      if (v) check(`Health.Check(${show(service)}) is SERVING`, v.status === 'SERVING', show(v));
    }
    const r = await health('no.such.Service');
    check('Health.Check of an unknown service -> NOT_FOUND', r.err && r.err.code === grpc.status.NOT_FOUND,
      r.err ? CODE_NAMES[r.err.code] : show(r.value));
  });

  await section('server reflection', async () => {
    const wanted = [SERVICE, 'grpc.health.v1.Health', 'grpc.reflection.v1.ServerReflection',
      'grpc.reflection.v1alpha.ServerReflection'];
    for (const version of ['v1', 'v1alpha']) {
      const name = `reflection ${version}`;
      const listed = await reflect(raw, version, { list_services: '*' });
      const list = expectOk(`${name} list_services`, listed);
      if (list) {
        const names = ((list.list_services_response || {}).service || []).map((s) => s.name);
        check(`${name} lists ${wanted.join(', ')}`, wanted.every((w) => names.includes(w)), show(names));
      }
      const found = expectOk(`${name} file_containing_symbol ${SERVICE}`,
        await reflect(raw, version, { file_containing_symbol: SERVICE }));
      const files = ((found && found.file_descriptor_response) || {}).file_descriptor_proto || [];
      const decoded = files.map((b) => descriptor.FileDescriptorProto.decode(b));
      const file = decoded.find((f) => f.name === 'normsvc/v1/normsvc.proto');
      if (check(`${name} serves normsvc/v1/normsvc.proto`, file, show(decoded.map((f) => f.name)))) {
        check(`${name}: its package is normsvc.v1`, file.package === 'normsvc.v1', file.package);
        const served = Object.fromEntries(file.service.find((s) => s.name === 'NormService').method
          .map((m) => [m.name, [m.inputType, m.outputType, Boolean(m.clientStreaming), Boolean(m.serverStreaming)]]));
        const ours = Object.fromEntries(serviceType.methodsArray.map((m) => [m.name,
          [`.${m.resolvedRequestType.fullName.slice(1)}`, `.${m.resolvedResponseType.fullName.slice(1)}`,
            Boolean(m.requestStream), Boolean(m.responseStream)]]));
        check(`${name}: the served NormService is the one in protos/`, same(served, ours),
          `served ${show(served)} vs protos ${show(ours)}`);
        const fieldsOf = (msgs) => Object.fromEntries(msgs.map((m) => [m.name,
          m.field.map((f) => `${f.name}=${f.number}`).sort()]));
        const ourMessages = root.lookup('normsvc.v1').nestedArray.filter((t) => t instanceof protobuf.Type);
        check(`${name}: the served messages are the ones in protos/`, same(fieldsOf(file.messageType),
          Object.fromEntries(ourMessages.map((t) => [t.name, t.fieldsArray.map((f) => `${f.name}=${f.id}`).sort()]))),
        'field names or numbers differ');
        const deps = decoded.map((f) => f.name);
        check(`${name}: dependencies come along`, deps.includes('google/protobuf/timestamp.proto'), show(deps));
      }
      const self = expectOk(`${name} describes itself`,
        await reflect(raw, version, { file_containing_symbol: `grpc.reflection.${version}.ServerReflection` }));
      if (self) {
        const got = ((self.file_descriptor_response || {}).file_descriptor_proto || [])
          .map((b) => descriptor.FileDescriptorProto.decode(b).package);
        check(`${name}: its own file has package grpc.reflection.${version}`, got.includes(`grpc.reflection.${version}`),
          show(got));
      }
      const missing = expectOk(`${name} unknown symbol`, await reflect(raw, version, { file_containing_symbol: 'no.Such' }));
      if (missing) {
        check(`${name} unknown symbol -> error_response NOT_FOUND`,
          missing.error_response && missing.error_response.error_code === grpc.status.NOT_FOUND, show(missing));
      }
    }
  });

  await section('CreateLayer: resolved configs and starting statistics', async () => {
    const bn = await call('CreateLayer', { name: `${P}bn`, config: {} });
    const layer = expectOk('CreateLayer with an empty config', bn);
    if (layer) {
      const c = layer.layer.config;
      check('LAYER_KIND_UNSPECIFIED resolves to LAYER_KIND_BATCH', c.kind === 'LAYER_KIND_BATCH', c.kind);
      check('CONVENTION_UNSPECIFIED resolves to CONVENTION_KERAS', c.convention === 'CONVENTION_KERAS', c.convention);
      check('keras defaults: momentum 0.99, epsilon 1e-3', c.momentum === 0.99 && c.epsilon === 1e-3, show(c));
      check('empty axis resolves to [-1]', same(c.axis, [-1]), show(c.axis));
      check('center and scale resolve to true', c.center === true && c.scale === true, show(c));
      check('groups is unset for a batch layer (group layers only)', c.groups === undefined, show(c.groups));
      check('num_features is unset while the shape is to be learned', (c.num_features || []).length === 0,
        show(c.num_features));
      const s = layer.layer.stats;
      check('a new layer answers its statistics', s !== undefined, show(layer.layer));
      const mean = read(s && s.mean);
      const variance = read(s && s.variance);
      check('keras starts at mean 0, variance 1, as scalars until the shape is learned',
        mean && variance && same(mean.shape, []) && same(mean.values, [0]) && same(variance.values, [1]),
        show({ mean, variance }));
      check('a new layer: count 0, num_batches 0, version 0, not frozen',
        num(s.count) === 0 && num(s.num_batches) === 0 && num(s.version) === 0 && !s.frozen, show(s));
      check('a new layer: updated_at is set', s.updated_at && num(s.updated_at.seconds) > 1.5e9, show(s.updated_at));
      const again = await call('CreateLayer', { name: `${P}bn` });
      const v = expectOk('CreateLayer again without config (idempotent)', again);
      if (v) check('the same layer comes back', same(v.layer.config, c), show(v.layer.config));
      const round = expectOk('CreateLayer with the resolved config it answered',
        await call('CreateLayer', { name: `${P}bn`, config: c }));
      if (round) check('the resolved config creates the same layer', same(round.layer.config, c), show(round.layer.config));
    }

    const sized = expectOk('CreateLayer keras num_features [3]',
      await create(`${P}bn3`, { num_features: [3] }));
    if (sized) {
      const m = read(sized.layer.stats.mean);
      const v = read(sized.layer.stats.variance);
      check('a declared shape starts at zeros / ones of that shape',
        same(m.shape, [3]) && same(m.values, [0, 0, 0]) && same(v.values, [1, 1, 1]), show({ m, v }));
    }

    const torch = expectOk('CreateLayer torch', await create(`${P}torch`, { convention: 'CONVENTION_TORCH', num_features: [2] }));
    if (torch) {
      const c = torch.layer.config;
      check('torch defaults: momentum 0.1, epsilon 1e-5', c.momentum === 0.1 && c.epsilon === 1e-5, show(c));
      const s = torch.layer.stats;
      check('torch starts at mean 0, variance 1, num_batches 0',
        same(read(s.mean).values, [0, 0]) && same(read(s.variance).values, [1, 1]) && num(s.num_batches) === 0, show(s));
    }
    const avg = expectOk('CreateLayer torch cumulative_average',
      await create(`${P}torchavg`, { convention: 'CONVENTION_TORCH', cumulative_average: true }));
    if (avg) {
      const c = avg.layer.config;
      check('cumulative_average: momentum unset, cumulative_average true', c.momentum === undefined && c.cumulative_average === true,
        show(c));
    }
    const cum = expectOk('CreateLayer cumulative', await create(`${P}cum`, { convention: 'CONVENTION_CUMULATIVE', num_features: [1] }));
    if (cum) {
      const c = cum.layer.config;
      check('cumulative defaults: momentum unset, epsilon 1e-3', c.momentum === undefined && c.epsilon === 1e-3, show(c));
      const s = cum.layer.stats;
      check('cumulative starts at mean 0, variance 0, count 0',
        same(read(s.mean).values, [0]) && same(read(s.variance).values, [0]) && num(s.count) === 0, show(s));
      const round = expectOk('CreateLayer cumulative with the resolved config', await create(`${P}cum`, c));
      if (round) check('the resolved cumulative config creates the same layer', same(round.layer.config, c));
    }
    const group = expectOk('CreateLayer group', await create(`${P}gn`, { kind: 'LAYER_KIND_GROUP' }));
    if (group) {
      check('groups resolves to 32 for a group layer', group.layer.config.groups === 32, show(group.layer.config));
      check('a group layer keeps statistics of shape [groups]', same(read(group.layer.stats.mean).shape, [32]),
        show(read(group.layer.stats.mean)));
    }
    for (const kind of ['LAYER_KIND_LAYER', 'LAYER_KIND_RMS']) {
      const l = expectOk(`CreateLayer ${kind}`, await create(`${P}${kind.toLowerCase()}`, { kind }));
      if (l) check(`${kind} keeps scalar statistics`, same(read(l.layer.stats.mean).shape, []), show(read(l.layer.stats.mean)));
    }

    const clash = await create(`${P}bn`, { momentum: 0.5 });
    const d = expectError('CreateLayer with another config', clash, grpc.status.ALREADY_EXISTS,
      { layer: `${P}bn`, resource: true, reason: 'CONFIG_CONFLICT' });
    if (d) {
      check('ALREADY_EXISTS carries ResourceInfo', d.ResourceInfo !== undefined, d.types.join(', '));
      check('ALREADY_EXISTS names the field that differs', /momentum/.test(clash.err.details), clash.err.details);
    }
  });

  await section('layer names', async () => {
    const ok = [`${P}a`, `${P}A-z_0.9/x`, `${P}${'n'.repeat(256 - P.length)}`];
    for (const name of ok) {
      expectOk(`CreateLayer name of ${name.length} characters ${show(name.slice(P.length)).slice(0, 24)}`, await create(name));
      await call('DeleteLayer', { name });
    }
    const bad = ['', 'x'.repeat(257), 'a b', 'a//b', '/a', 'a/', 'é', 'a\u0000b', 'a:b'];
    for (const name of bad) {
      expectError(`CreateLayer name ${show(name).slice(0, 20)}${name.length > 20 ? '...' : ''}`, await create(name),
        grpc.status.INVALID_ARGUMENT, { type: 'normsvc.v1.CreateLayerRequest', request: { name }, field: 'name' });
    }
  });

  await section('CreateLayer: bad configs name their field', async () => {
    const cases = [
      ['kind 99', { kind: 99 }, 'config.kind'],
      ['convention 99', { convention: 99 }, 'config.convention'],
      ['momentum 2', { momentum: 2 }, 'config.momentum'],
      ['epsilon -1', { epsilon: -1 }, 'config.epsilon'],
      ['groups on a batch layer', { groups: 4 }, 'config.groups'],
      ['groups 0', { kind: 'LAYER_KIND_GROUP', groups: 0 }, 'config.groups'],
      ['cumulative_average with momentum', { convention: 'CONVENTION_TORCH', cumulative_average: true, momentum: 0.1 }, null],
      ['cumulative convention with momentum', { convention: 'CONVENTION_CUMULATIVE', momentum: 0.5 }, 'config.momentum'],
      ['num_features [0]', { num_features: [0] }, 'config.num_features'],
      ['num_features of rank 2 for axis -1', { num_features: [2, 2] }, 'config.num_features'],
      ['group num_features not [groups]', { kind: 'LAYER_KIND_GROUP', num_features: [5] }, 'config.num_features'],
      ['group axis 0', { kind: 'LAYER_KIND_GROUP', axis: [0] }, 'config.axis'],
      ['axis repeated', { axis: [1, 1] }, 'config.axis'],
    ];
    for (const [what, cfg, field] of cases) {
      const request = { name: `${P}bad`, config: cfg };
      expectError(`CreateLayer ${what}`, await call('CreateLayer', request), grpc.status.INVALID_ARGUMENT,
        { type: 'normsvc.v1.CreateLayerRequest', request, ...(field ? { field } : {}) });
    }
  });

  await section('GetLayer', async () => {
    await mustCreate(`${P}get/a`);
    await mustCreate(`${P}get/b`, { convention: 'CONVENTION_TORCH' });
    const r = expectOk('GetLayer two layers', await call('GetLayer', { names: [`${P}get/b`, `${P}get/a`] }));
    if (r) {
      check('GetLayer answers in the order of the request', same(r.layers.map((l) => l.name), [`${P}get/b`, `${P}get/a`]),
        show(r.layers.map((l) => l.name)));
      check('GetLayer answers config and stats', r.layers.every((l) => l.config && l.stats), show(r.layers));
    }
    const T_ = 'normsvc.v1.GetLayerRequest';
    for (const [what, names, field] of [
      ['no names', [], 'names'],
      ['an empty name', [''], 'names[0]'],
      ['a bad second name', [`${P}get/a`, 'a b'], 'names[1]'],
    ]) {
      expectError(`GetLayer ${what}`, await call('GetLayer', { names }), grpc.status.INVALID_ARGUMENT,
        { type: T_, request: { names }, field });
    }
    const nf = await call('GetLayer', { names: [`${P}get/a`, `${P}get/none`] });
    expectError('GetLayer of an unknown layer', nf, grpc.status.NOT_FOUND, { layer: `${P}get/none`, reason: 'LAYER_NOT_FOUND' });
    if (nf.err) check('NOT_FOUND names the layer', nf.err.details.includes(`${P}get/none`), nf.err.details);
  });

  await section('ListLayers', async () => {
    const names = ['e', 'c', 'a', 'd', 'b'].map((x) => `${P}list/${x}`);
    for (const n of names) await mustCreate(n);
    const seen = [];
    let token = '';
    let pages = 0;
    let withStats = true;
    do {
      const r = await call('ListLayers', { prefix: `${P}list/`, page_size: 2, page_token: token });
      if (!expectOk(`ListLayers page ${pages + 1}`, r)) break;
      seen.push(...r.value.layers.map((l) => l.name));
      withStats = withStats && r.value.layers.every((l) => l.stats === undefined && l.config);
      token = r.value.next_page_token || '';
      pages += 1;
    } while (token && pages < 10);
    check('ListLayers pages through every layer, sorted by name', same(seen, [...names].sort()), show(seen));
    check('ListLayers: 3 pages of at most 2', pages === 3, String(pages));
    check('ListLayers: stats unset unless include_stats', withStats);
    const ws = expectOk('ListLayers include_stats', await call('ListLayers', { prefix: `${P}list/`, include_stats: true }));
    if (ws) check('include_stats answers stats', ws.layers.length === 5 && ws.layers.every((l) => l.stats), show(ws));
    expectOk('ListLayers page_size over the maximum is capped', await call('ListLayers', { prefix: `${P}list/`, page_size: 1000000 }));
    expectError('ListLayers page_size -1', await call('ListLayers', { page_size: -1 }), grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.ListLayersRequest', field: 'page_size' });
    expectError('ListLayers with a page_token it never issued', await call('ListLayers', { page_token: 'a' }),
      grpc.status.INVALID_ARGUMENT, { type: 'normsvc.v1.ListLayersRequest', field: 'page_token' });
  });

  await section('UpdateStats', async () => {
    const K = `${P}up/keras`;
    const Q = `${P}up/torch`;
    const C = `${P}up/cum`;
    await mustCreate(K);
    await mustCreate(Q, { convention: 'CONVENTION_TORCH' });
    await mustCreate(C, { convention: 'CONVENTION_CUMULATIVE' });
    const req = {
      updates: [
        { layer: K, moments: moments(4, [1, 2], [0.5, 2]) },
        { layer: Q, moments: moments(4, [1], [1.5]) },
        { layer: C, moments: moments(4, [2], [1]) },
      ],
    };
    const r = expectOk('UpdateStats of three layers', await call('UpdateStats', req));
    if (r) {
      check('UpdateStats answers in the order of the request', same(r.stats.map((s) => s.layer), [K, Q, C]), show(r.stats.map((s) => s.layer)));
      const [k, q, c] = r.stats.map((s) => s.stats);
      check('keras: moving = moving*0.99 + batch*0.01, shape learned',
        same(read(k.mean).shape, [2]) && close(read(k.mean).values, [0.01, 0.02]) && close(read(k.variance).values, [0.995, 1.01]),
        show([read(k.mean), read(k.variance)]));
      check('keras: count 4, num_batches 1, version 1', num(k.count) === 4 && num(k.num_batches) === 1 && num(k.version) === 1, show(k));
      check('torch: running = 0.9*running + 0.1*batch, unbiased variance',
        close(read(q.mean).values, [0.1]) && close(read(q.variance).values, [1.1]), show([read(q.mean), read(q.variance)]));
      check('cumulative: the first batch itself', close(read(c.mean).values, [2]) && close(read(c.variance).values, [1]) && num(c.count) === 4,
        show(c));
    }
    const r2 = expectOk('UpdateStats cumulative second batch', await call('UpdateStats', { updates: [{ layer: C, moments: moments(4, [4], [1]) }] }));
    if (r2) {
      const c = r2.stats[0].stats;
      check('cumulative: exact merge (mean 3, variance 2, count 8)',
        close(read(c.mean).values, [3]) && close(read(c.variance).values, [2]) && num(c.count) === 8, show(c));
    }
    const learned = await get(K);
    check('a learned shape shows in the statistics, config.num_features stays as given (unset)',
      same(read(learned.stats.mean).shape, [2]) && (learned.config.num_features || []).length === 0, show(learned));
    const once = { updates: [{ layer: K, moments: moments(2, [1, 1], [1, 1]) }], request_id: `${P}rid-1` };
    const a = expectOk('UpdateStats with a request_id', await call('UpdateStats', once));
    const b = expectOk('UpdateStats retried with the same request_id', await call('UpdateStats', once));
    if (a && b) check('a retry applies nothing again', num(a.stats[0].stats.version) === num(b.stats[0].stats.version), show([a, b]));

    const U = 'normsvc.v1.UpdateStatsRequest';
    const m = moments(2, [1, 1], [1, 1]);
    const bad = [
      ['no updates', { updates: [] }, 'updates'],
      ['an empty layer name', { updates: [{ layer: '', moments: m }] }, 'updates[0].layer'],
      ['a bad second layer name', { updates: [{ layer: K, moments: m }, { layer: 'a b', moments: m }] }, 'updates[1].layer'],
      ['a layer twice', { updates: [{ layer: K, moments: m }, { layer: K, moments: m }] }, 'updates[1].layer'],
      ['NaN in mean', { updates: [{ layer: K, moments: moments(2, [NaN, 1], [1, 1]) }] }, 'updates[0].moments.mean'],
      ['a negative variance', { updates: [{ layer: K, moments: moments(2, [1, 1], [-1, 1]) }] }, 'updates[0].moments.variance'],
      ['count 0', { updates: [{ layer: K, moments: moments(0, [1, 1], [1, 1]) }] }, 'updates[0].moments.count'],
      ['another shape than the layer', { updates: [{ layer: Q, moments: moments(4, [1, 2, 3], [1, 1, 1]) }] }, null],
      ['mean and variance of different shapes', { updates: [{ layer: K, moments: { ...m, variance: tensor([1], [1]) } }] }, null],
      ['no moments', { updates: [{ layer: K }] }, null],
      ['DTYPE_UNSPECIFIED', { updates: [{ layer: K, moments: { ...m, mean: { ...m.mean, dtype: 'DTYPE_UNSPECIFIED' } } }] }, null],
      ['data shorter than the shape', { updates: [{ layer: K, moments: { ...m, mean: tensor([1], [2]) } }] }, null],
      ['a negative dimension', { updates: [{ layer: K, moments: { ...m, mean: { ...m.mean, shape: [-2] } } }] }, null],
    ];
    for (const [what, request, field] of bad) {
      const before = await get(K);
      expectError(`UpdateStats ${what}`, await call('UpdateStats', request), grpc.status.INVALID_ARGUMENT,
        { type: U, request, ...(field ? { field } : {}) });
      const after = await get(K);
      check(`UpdateStats ${what}: nothing changed`, num(after.stats.version) === num(before.stats.version));
    }
    const before = await get(K);
    const nf = await call('UpdateStats', { updates: [{ layer: K, moments: m }, { layer: `${P}up/none`, moments: m }] });
    expectError('UpdateStats with an unknown layer', nf, grpc.status.NOT_FOUND, { layer: `${P}up/none` });
    check('UpdateStats is all-or-nothing', num((await get(K)).stats.version) === num(before.stats.version));
    if (limits.max_tensor_elements) {
      const n = limits.max_tensor_elements + 1;
      const big = { updates: [{ layer: `${P}up/big`, moments: moments(2, new Array(n).fill(0), new Array(n).fill(1)) }] };
      expectError('UpdateStats over the tensor element limit', await call('UpdateStats', big), grpc.status.RESOURCE_EXHAUSTED);
    }
    if (limits.max_layers_per_request) {
      const n = limits.max_layers_per_request + 1;
      const many = { updates: Array.from({ length: n }, (_, i) => ({ layer: `${P}up/many${i}`, moments: m })) };
      expectError('UpdateStats naming too many layers', await call('UpdateStats', many), grpc.status.RESOURCE_EXHAUSTED);
    }

    // the packed form: names, shapes and counts as repeated scalars, all means and variances in one tensor each
    const PK = `${P}up/packed-keras`;
    const PQ = `${P}up/packed-torch`;
    await mustCreate(PK);
    await mustCreate(PQ, { convention: 'CONVENTION_TORCH' });
    const packed = {
      packed: { layers: [PK, PQ], ndim: [1, 1], dims: [2, 1], count: [4, 4], mean: tensor([1, 2, 1]), variance: tensor([0.5, 2, 1.5]) },
    };
    const p = expectOk('UpdateStats packed', await call('UpdateStats', packed));
    if (p) {
      const s = p.packed;
      check('a packed request is answered packed, in its order', (p.stats || []).length === 0 && same(s.layers, [PK, PQ]), show(p));
      check('packed answer: shapes', same(s.ndim.map(num), [1, 1]) && same(s.dims.map(num), [2, 1]), show(s));
      check('packed answer: keras and torch statistics as per layer',
        close(read(s.mean).values, [0.01, 0.02, 0.1]) && close(read(s.variance).values, [0.995, 1.01, 1.1]), show(s));
      check('packed answer: counts, versions, no step yet',
        same(s.count.map(num), [4, 4]) && same(s.version.map(num), [1, 1]) && same(s.last_step.map(num), [-1, -1]), show(s));
    }
    const PU = 'normsvc.v1.UpdateStatsRequest';
    const good = packed.packed;
    const badPacked = [
      ['both updates and packed', { ...packed, updates: [{ layer: K, moments: m }] }, 'packed'],
      ['packed with a bad layer name', { packed: { ...good, layers: [PK, 'a b'] } }, 'packed.layers[1]'],
      ['packed with an ndim per layer missing', { packed: { ...good, ndim: [1] } }, 'packed.ndim'],
      ['packed dims that do not add up', { packed: { ...good, dims: [2] } }, 'packed.dims'],
      ['packed mean of another size', { packed: { ...good, mean: tensor([1, 2]) } }, 'packed.mean'],
      ['packed NaN in a variance', { packed: { ...good, variance: tensor([0.5, NaN, 1.5]) } }, 'packed.variance'],
      ['packed count 0', { packed: { ...good, count: [4, 0] } }, 'packed.count'],
    ];
    for (const [what, request, field] of badPacked) {
      const before = await get(PK);
      expectError(`UpdateStats ${what}`, await call('UpdateStats', request), grpc.status.INVALID_ARGUMENT, { type: PU, request, field });
      check(`UpdateStats ${what}: nothing changed`, num((await get(PK)).stats.version) === num(before.stats.version));
    }
  });

  await section('ResetStats', async () => {
    const L = `${P}reset/a`;
    await mustCreate(L);
    await call('UpdateStats', { updates: [{ layer: L, moments: moments(4, [3, 4], [2, 2]) }] });
    const r = expectOk('ResetStats', await call('ResetStats', { name: L }));
    if (r) {
      const s = r.stats;
      check('ResetStats: back to mean 0, variance 1, keeping the learned shape',
        same(read(s.mean).values, [0, 0]) && same(read(s.variance).values, [1, 1]), show(s));
      check('ResetStats: count 0, num_batches 0, version grows', num(s.count) === 0 && num(s.num_batches) === 0 && num(s.version) === 2, show(s));
    }
    expectError('ResetStats of an unknown layer', await call('ResetStats', { name: `${P}reset/none` }), grpc.status.NOT_FOUND,
      { layer: `${P}reset/none` });
    expectError('ResetStats with an empty name', await call('ResetStats', { name: '' }), grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.ResetStatsRequest', field: 'name' });
  });

  const x = [1, 10, 2, 20, 3, 30, 6, 60];
  const batchMean = [3, 30];
  const batchVar = [3.5, 350];

  await section('Normalize', async () => {
    const L = `${P}norm/bn`;
    await mustCreate(L);
    const N = 'normsvc.v1.NormalizeRequest';
    const train = expectOk('Normalize training', await call('Normalize', { layer: L, x: tensor(x, [4, 2], 'DTYPE_FLOAT32'), mode: 'MODE_TRAINING' }));
    if (train) {
      const y = read(train.y);
      const want = x.map((v, i) => (v - batchMean[i % 2]) / Math.sqrt(batchVar[i % 2] + 1e-3));
      check('training: y has the dtype and shape of x', y.dtype === 'DTYPE_FLOAT32' && same(y.shape, [4, 2]), show(y));
      check('training: y is normalized with the batch statistics', y.values && close(y.values, want, 1e-5), show([y.values, want]));
      const bm = train.batch_moments;
      check('training: batch_moments are the batch\'s', bm && close(read(bm.mean).values, batchMean) &&
        close(read(bm.variance).values, batchVar) && read(bm.count).values.every((c) => c === 4), show(bm));
      check('training: stats are present (the running statistics were updated)', train.stats && num(train.stats.version) === 1,
        show(train.stats));
    }
    const noUpdate = expectOk('Normalize training update=false',
      await call('Normalize', { layer: L, x: tensor(x, [4, 2]), mode: 'MODE_TRAINING', update: false }));
    if (noUpdate) {
      check('update=false: batch_moments present, stats unset', noUpdate.batch_moments && noUpdate.stats === undefined, show(noUpdate));
      check('update=false: the layer did not change', num((await get(L)).stats.version) === 1);
    }
    const running = await get(L);
    const inf = expectOk('Normalize inference', await call('Normalize', { layer: L, x: tensor(x, [4, 2]), mode: 'MODE_INFERENCE' }));
    if (inf) {
      const rm = read(running.stats.mean).values;
      const rv = read(running.stats.variance).values;
      const want = x.map((v, i) => (v - rm[i % 2]) / Math.sqrt(rv[i % 2] + 1e-3));
      check('inference: y is normalized with the running statistics', close(read(inf.y).values, want, 1e-9), show(read(inf.y)));
      check('inference: batch_moments and stats unset', inf.batch_moments === undefined && inf.stats === undefined, show(inf));
      check('inference: y is float64 like x', inf.y.dtype === 'DTYPE_FLOAT64');
    }
    const half = expectOk('Normalize float16', await call('Normalize', { layer: L, x: tensor([1, 2, 3, 4], [2, 2], 'DTYPE_FLOAT16'), mode: 'MODE_INFERENCE' }));
    if (half) check('float16 in, float16 out', half.y.dtype === 'DTYPE_FLOAT16' && same(read(half.y).shape, [2, 2]), show(half.y));
    const affine = expectOk('Normalize with gamma and beta', await call('Normalize', {
      layer: L, x: tensor(x, [4, 2]), mode: 'MODE_TRAINING', update: false, gamma: tensor([2, 3]), beta: tensor([1, -1]),
    }));
    if (affine) {
      const want = x.map((v, i) => ((v - batchMean[i % 2]) / Math.sqrt(batchVar[i % 2] + 1e-3)) * [2, 3][i % 2] + [1, -1][i % 2]);
      check('y = x_hat * gamma + beta', close(read(affine.y).values, want, 1e-9), show(read(affine.y)));
    }
    const cum = `${P}norm/cum`;
    await mustCreate(cum, { convention: 'CONVENTION_CUMULATIVE' });
    expectError('Normalize inference on a cumulative layer with no samples',
      await call('Normalize', { layer: cum, x: tensor(x, [4, 2]), mode: 'MODE_INFERENCE' }), grpc.status.FAILED_PRECONDITION,
      { layer: cum });
    const unscaled = `${P}norm/unscaled`;
    await mustCreate(unscaled, { scale: false });
    const rms = `${P}norm/rms`;
    await mustCreate(rms, { kind: 'LAYER_KIND_RMS' });
    const xt = tensor(x, [4, 2]);
    const bad = [
      ['MODE_UNSPECIFIED', { layer: L, x: xt }, 'mode'],
      ['without x', { layer: L, mode: 'MODE_TRAINING' }, 'x'],
      ['an empty layer name', { layer: '', x: xt, mode: 'MODE_TRAINING' }, 'layer'],
      ['a bad layer name', { layer: 'a b', x: xt, mode: 'MODE_TRAINING' }, 'layer'],
      ['x of another feature size', { layer: L, x: tensor([1, 2, 3, 4, 5, 6], [2, 3]), mode: 'MODE_TRAINING' }, 'x'],
      ['x with data shorter than its shape', { layer: L, x: tensor([1, 2], [4, 2]), mode: 'MODE_TRAINING' }, null],
      ['x of DTYPE_UNSPECIFIED', { layer: L, x: { ...xt, dtype: 'DTYPE_UNSPECIFIED' }, mode: 'MODE_TRAINING' }, null],
      ['gamma of the wrong size', { layer: L, x: xt, mode: 'MODE_TRAINING', gamma: tensor([1, 2, 3]) }, 'gamma'],
      ['gamma on a scale=false layer', { layer: unscaled, x: xt, mode: 'MODE_TRAINING', gamma: tensor([1, 1]) }, 'gamma'],
      ['beta on an rms layer', { layer: rms, x: xt, mode: 'MODE_TRAINING', beta: tensor([1, 1]) }, 'beta'],
    ];
    for (const [what, request, field] of bad) {
      expectError(`Normalize ${what}`, await call('Normalize', request), grpc.status.INVALID_ARGUMENT,
        { type: N, request, ...(field ? { field } : {}) });
    }
    expectError('Normalize of an unknown layer', await call('Normalize', { layer: `${P}norm/none`, x: xt, mode: 'MODE_TRAINING' }),
      grpc.status.NOT_FOUND, { layer: `${P}norm/none` });
    if (limits.max_tensor_elements) {
      const n = limits.max_tensor_elements + 2;
      expectError('Normalize x over the tensor element limit',
        await call('Normalize', { layer: L, x: tensor(new Array(n).fill(1), [n / 2, 2]), mode: 'MODE_INFERENCE' }),
        grpc.status.RESOURCE_EXHAUSTED);
    }
  });

  await section('NormalizeStream', async () => {
    const L = `${P}stream/bn`;
    await mustCreate(L, { num_features: [2] });
    const data = tensor(x, [4, 2]).data;
    const header = { layer: L, dtype: 'DTYPE_FLOAT64', shape: [4, 2], mode: 'MODE_TRAINING' };
    const run = async (messages) => {
      const c = stub.NormalizeStream(new grpc.Metadata(), { deadline: Date.now() + 30000 });
      const out = collect(c, { timeoutMs: 30000 });
      for (const m of messages) c.write(m);
      c.end();
      return out;
    };
    const r = await run([{ header }, { chunk: data.subarray(0, 5) }, { chunk: data.subarray(5, 40) }, { chunk: data.subarray(40) }]);
    if (check('NormalizeStream -> OK', !r.err, r.err && r.err.details)) {
      const [first, ...rest] = r.messages;
      const res = first && first.result;
      check('NormalizeStream: the first response is the result', res && res.dtype === 'DTYPE_FLOAT64' && same(res.shape.map(Number), [4, 2]),
        show(first));
      const y = read({ dtype: 'DTYPE_FLOAT64', shape: [4, 2], data: Buffer.concat(rest.map((m) => m.chunk)) });
      const want = x.map((v, i) => (v - batchMean[i % 2]) / Math.sqrt(batchVar[i % 2] + 1e-3));
      check('NormalizeStream: y arrives in chunks after it', rest.every((m) => m.chunk) && y.values && close(y.values, want, 1e-9),
        show(y));
      check('NormalizeStream training: batch_moments and updated stats', res && res.batch_moments && res.stats && num(res.stats.version) === 1,
        show(res));
    }
    const S = 'normsvc.v1.NormalizeStreamRequest';
    const cases = [
      ['starting with a chunk', [{ chunk: data }], 'header'],
      ['with an empty layer name', [{ header: { ...header, layer: '' } }, { chunk: data }], 'header.layer'],
      ['with two headers', [{ header }, { header }], null],
      ['with too few bytes', [{ header }, { chunk: data.subarray(0, 8) }], null],
      ['with too many bytes', [{ header }, { chunk: data }, { chunk: data }], null],
      ['with MODE_UNSPECIFIED', [{ header: { ...header, mode: 'MODE_UNSPECIFIED' } }, { chunk: data }], 'header.mode'],
    ];
    for (const [what, messages, field] of cases) {
      const res = await run(messages);
      expectError(`NormalizeStream ${what}`, res, grpc.status.INVALID_ARGUMENT, { type: S, request: messages[0], ...(field ? { field } : {}) });
    }
    expectError('NormalizeStream of an unknown layer', await run([{ header: { ...header, layer: `${P}stream/none` } }, { chunk: data }]),
      grpc.status.NOT_FOUND, { layer: `${P}stream/none` });
  });

  await section('Freeze and Unfreeze', async () => {
    const L = `${P}frozen/bn`;
    await mustCreate(L);
    await call('UpdateStats', { updates: [{ layer: L, moments: moments(4, [1, 2], [1, 1]) }] });
    const f = expectOk('Freeze', await call('Freeze', { name: L }));
    if (f) check('Freeze: frozen, version grows', f.stats.frozen === true && num(f.stats.version) === 2, show(f.stats));
    const frozen = await get(L);
    const m = moments(2, [1, 1], [1, 1]);
    expectError('UpdateStats of a frozen layer', await call('UpdateStats', { updates: [{ layer: L, moments: m }] }),
      grpc.status.FAILED_PRECONDITION, { layer: L, reason: 'FROZEN_LAYER' });
    const t = expectOk('Normalize training on a frozen layer',
      await call('Normalize', { layer: L, x: tensor(x, [4, 2]), mode: 'MODE_TRAINING' }));
    if (t) {
      const rm = read(frozen.stats.mean).values;
      const rv = read(frozen.stats.variance).values;
      const want = x.map((v, i) => (v - rm[i % 2]) / Math.sqrt(rv[i % 2] + 1e-3));
      check('frozen, training: y is normalized with the running statistics (as inference)', close(read(t.y).values, want, 1e-9),
        show(read(t.y)));
      check('frozen, training: no batch_moments', t.batch_moments === undefined, show(t.batch_moments));
      check('frozen, training: stats unset (the running statistics were not updated)', t.stats === undefined, show(t.stats));
    }
    check('frozen, training: the layer did not change', num((await get(L)).stats.version) === num(frozen.stats.version));
    const c = stub.NormalizeStream(new grpc.Metadata(), { deadline: Date.now() + 30000 });
    const out = collect(c, { timeoutMs: 30000 });
    c.write({ header: { layer: L, dtype: 'DTYPE_FLOAT64', shape: [4, 2], mode: 'MODE_TRAINING' } });
    c.write({ chunk: tensor(x, [4, 2]).data });
    c.end();
    const s = await out;
    if (check('NormalizeStream training on a frozen layer -> OK', !s.err, s.err && s.err.details)) {
      const res = s.messages[0].result;
      check('NormalizeStream frozen, training: stats and batch_moments unset', res.stats === undefined && res.batch_moments === undefined,
        show(res));
    }
    const u = expectOk('Unfreeze', await call('Unfreeze', { name: L }));
    if (u) check('Unfreeze: not frozen', !u.stats.frozen, show(u.stats));
    expectOk('UpdateStats after Unfreeze', await call('UpdateStats', { updates: [{ layer: L, moments: m }] }));
    for (const method of ['Freeze', 'Unfreeze']) {
      expectError(`${method} of an unknown layer`, await call(method, { name: `${P}frozen/none` }), grpc.status.NOT_FOUND,
        { layer: `${P}frozen/none` });
      expectError(`${method} with an empty name`, await call(method, { name: '' }), grpc.status.INVALID_ARGUMENT,
        { type: `normsvc.v1.${method}Request`, field: 'name' });
    }
  });

  await section('AllReduceMoments', async () => {
    const L = `${P}ar/bn`;
    await mustCreate(L);
    const group = `${P}job`;
    const rank = (r, step, m, extra = {}) => call('AllReduceMoments',
      { group, step, rank: r, world_size: 2, moments: [{ layer: L, moments: m }], ...extra });
    const [a, b] = await Promise.all([rank(0, 0, moments(2, [0, 0], [1, 1])), rank(1, 0, moments(2, [2, 4], [1, 1]))]);
    const ra = expectOk('AllReduceMoments rank 0', a);
    const rb = expectOk('AllReduceMoments rank 1', b);
    if (ra && rb) {
      const g = ra.global_moments[0].moments;
      check('every rank gets the same global moments', same(show(g), show(rb.global_moments[0].moments)));
      check('global moments: the merge of the ranks', read(g.count).values[0] === 4 && close(read(g.mean).values, [1, 2]) &&
        close(read(g.variance).values, [2, 5]), show([read(g.count), read(g.mean), read(g.variance)]));
      check('the running statistics took one update for the step', ra.stats.length === 1 && num(ra.stats[0].stats.num_batches) === 1 &&
        num((await get(L)).stats.version) === 1, show(ra.stats));
    }
    const [c, d] = await Promise.all([
      rank(0, 1, moments(2, [0, 0], [1, 1]), { update_stats: false }), rank(1, 1, moments(2, [2, 4], [1, 1]), { update_stats: false })]);
    const rc = expectOk('AllReduceMoments update_stats=false', c);
    expectOk('AllReduceMoments update_stats=false, rank 1', d);
    if (rc) check('update_stats=false: stats empty, the layer unchanged', (rc.stats || []).length === 0 && num((await get(L)).stats.version) === 1);

    const lonely = await call('AllReduceMoments', { group, step: 2, rank: 0, world_size: 2, moments: [{ layer: L, moments: moments(2, [0, 0], [1, 1]) }] },
      { timeoutMs: 1500 });
    check('a missing rank: DEADLINE_EXCEEDED at the caller\'s deadline', lonely.err && lonely.err.code === grpc.status.DEADLINE_EXCEEDED &&
      lonely.ms >= 1000 && lonely.ms < 6000, lonely.err ? `${CODE_NAMES[lonely.err.code]} after ${lonely.ms} ms` : 'succeeded');
    if (lonely.err && decodeDetails(lonely.err)) expectError('a missing rank', lonely, grpc.status.DEADLINE_EXCEEDED);

    const first = rank(0, 3, moments(2, [0, 0], [1, 1]));
    await sleep(300);
    expectError('AllReduceMoments: a rank that joins twice', await rank(0, 3, moments(2, [0, 0], [1, 1])), grpc.status.ALREADY_EXISTS,
      { reason: 'DUPLICATE_RANK' });
    const other = { group, step: 3, rank: 1, world_size: 2, moments: [{ layer: `${P}ar/other`, moments: moments(2, [0, 0], [1, 1]) }] };
    await mustCreate(`${P}ar/other`);
    expectError('AllReduceMoments: a rank with other layers than the first', await call('AllReduceMoments', other), grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.AllReduceMomentsRequest', request: other });
    const second = await rank(1, 3, moments(2, [0, 0], [1, 1]));
    expectOk('AllReduceMoments: the step completes with its last rank', second);
    expectOk('AllReduceMoments: the waiting rank completes too', await first);
    expectError('AllReduceMoments: joining a completed step', await rank(1, 3, moments(2, [0, 0], [1, 1])), grpc.status.ALREADY_EXISTS,
      { reason: 'DUPLICATE_RANK' });

    const A = 'normsvc.v1.AllReduceMomentsRequest';
    const m = [{ layer: L, moments: moments(2, [0, 0], [1, 1]) }];
    const bad = [
      ['step -1', { group, step: -1, rank: 0, world_size: 1, moments: m }, 'step'],
      ['rank >= world_size', { group, step: 9, rank: 2, world_size: 2, moments: m }, 'rank'],
      ['world_size 0', { group, step: 9, rank: 0, world_size: 0, moments: m }, 'world_size'],
      ['no moments', { group, step: 9, rank: 0, world_size: 1, moments: [] }, 'moments'],
      ['an empty layer name', { group, step: 9, rank: 0, world_size: 1, moments: [{ ...m[0], layer: '' }] }, 'moments[0].layer'],
      ['a group of 129 characters', { group: 'g'.repeat(129), step: 9, rank: 0, world_size: 1, moments: m }, 'group'],
      ['NaN in mean', { group, step: 9, rank: 0, world_size: 1, moments: [{ layer: L, moments: moments(2, [NaN, 0], [1, 1]) }] },
        'moments[0].moments.mean'],
    ];
    for (const [what, request, field] of bad) {
      expectError(`AllReduceMoments ${what}`, await call('AllReduceMoments', request), grpc.status.INVALID_ARGUMENT, { type: A, request, field });
    }
    expectError('AllReduceMoments of an unknown layer', await call('AllReduceMoments',
      { group, step: 10, rank: 0, world_size: 1, moments: [{ layer: `${P}ar/none`, moments: moments(2, [0, 0], [1, 1]) }] }),
    grpc.status.NOT_FOUND, { layer: `${P}ar/none` });
    await call('Freeze', { name: L });
    expectError('AllReduceMoments of a frozen layer', await call('AllReduceMoments',
      { group, step: 11, rank: 0, world_size: 1, moments: m }), grpc.status.FAILED_PRECONDITION, { layer: L });
  });

  await section('WatchLayer', async () => {
    const L = `${P}watch/bn`;
    await mustCreate(L);
    const m = moments(2, [1, 1], [1, 1]);
    const watch = (request, opts = {}) => stub.WatchLayer(request, new grpc.Metadata(), { deadline: Date.now() + (opts.timeoutMs || 30000) });
    const first = await collect(watch({ names: [L] }), { count: 1 });
    check('WatchLayer starts with the current statistics', !first.err && first.messages.length === 1 &&
      first.messages[0].layer === L && num(first.messages[0].stats.version) === 0, show(first));

    const c = watch({ names: [L], skip_initial: true });
    const got = collect(c, { count: 1, timeoutMs: 15000 });
    let version = 0;
    let arrived = null;
    got.then((r) => { arrived = r; });
    for (let i = 0; i < 10 && !arrived; i++) {
      await sleep(500);
      if (!arrived) {
        const u = await call('UpdateStats', { updates: [{ layer: L, moments: m }] });
        if (!u.err) version = Math.max(version, num(u.value.stats[0].stats.version));
      }
    }
    const r = await got;
    check('WatchLayer skip_initial: the first message is a new version', !r.err && r.messages.length === 1 &&
      num(r.messages[0].stats.version) >= 1 && num(r.messages[0].stats.version) <= version, show(r));

    const d = watch({ names: [L], skip_initial: true });
    const deleted = collect(d, { timeoutMs: 15000 });
    await sleep(500);
    await call('DeleteLayer', { name: L });
    const end = await deleted;
    expectError('WatchLayer of a layer that is deleted', { err: end.err, value: end.messages }, grpc.status.NOT_FOUND, { layer: L });

    const W = 'normsvc.v1.WatchLayerRequest';
    for (const [what, names, field] of [['no names', [], 'names'], ['an empty name', [''], 'names[0]'],
      ['a bad second name', [`${P}watch/x`, 'a b'], 'names[1]']]) {
      const res = await collect(watch({ names }), { count: 1 });
      expectError(`WatchLayer ${what}`, { err: res.err, value: res.messages }, grpc.status.INVALID_ARGUMENT, { type: W, request: { names }, field });
    }
    const nf = await collect(watch({ names: [`${P}watch/none`] }), { count: 1 });
    expectError('WatchLayer of an unknown layer', { err: nf.err, value: nf.messages }, grpc.status.NOT_FOUND, { layer: `${P}watch/none` });
  });

  await section('ExportStats and ImportStats', async () => {
    const K = `${P}io/keras`;
    const Q = `${P}io/torch`;
    await mustCreate(K);
    await mustCreate(Q, { convention: 'CONVENTION_TORCH' });
    await call('UpdateStats', { updates: [{ layer: K, moments: moments(4, [1, 2], [1, 1]) }, { layer: Q, moments: moments(4, [3], [2]) }] });
    const parse = (buf) => {
      const n = Number(buf.readBigUInt64LE(0));
      return JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
    };
    const ek = expectOk('ExportStats keras naming', await call('ExportStats', { names: [K], naming: 'NAMING_KERAS' }));
    if (ek) {
      const h = parse(ek.safetensors);
      check('keras naming: <layer>/moving_mean and <layer>/moving_variance, float64',
        h[`${K}/moving_mean`] && h[`${K}/moving_variance`] && h[`${K}/moving_mean`].dtype === 'F64' && same(h[`${K}/moving_mean`].shape, [2]),
        show(Object.keys(h)));
      check('ExportStats answers the layers', same(ek.layers, [K]), show(ek.layers));
    }
    const et = expectOk('ExportStats torch naming float32', await call('ExportStats', { names: [Q], naming: 'NAMING_TORCH', dtype: 'DTYPE_FLOAT32' }));
    if (et) {
      const h = parse(et.safetensors);
      check('torch naming: running_mean, running_var, num_batches_tracked',
        h[`${Q}.running_mean`] && h[`${Q}.running_var`] && h[`${Q}.num_batches_tracked`], show(Object.keys(h)));
      check('DTYPE_FLOAT32 exports float32', h[`${Q}.running_mean`] && h[`${Q}.running_mean`].dtype === 'F32', show(h[`${Q}.running_mean`]));
    }
    const E = 'normsvc.v1.ExportStatsRequest';
    expectError('ExportStats DTYPE_FLOAT16', await call('ExportStats', { names: [K], dtype: 'DTYPE_FLOAT16' }), grpc.status.INVALID_ARGUMENT,
      { type: E, field: 'dtype' });
    expectError('ExportStats naming 7', await call('ExportStats', { names: [K], naming: 7 }), grpc.status.INVALID_ARGUMENT,
      { type: E, field: 'naming' });
    expectError('ExportStats an empty name', await call('ExportStats', { names: [K, ''] }), grpc.status.INVALID_ARGUMENT,
      { type: E, request: { names: [K, ''] }, field: 'names[1]' });
    expectError('ExportStats of an unknown layer', await call('ExportStats', { names: [`${P}io/none`] }), grpc.status.NOT_FOUND,
      { layer: `${P}io/none` });
    const ep = expectOk('ExportStats prefix with strip_prefix', await call('ExportStats', { prefix: `${P}io/`, strip_prefix: `${P}io/` }));
    if (ep) {
      const keys = Object.keys(parse(ep.safetensors)).filter((k) => k !== '__metadata__').sort();
      check('prefix selects its layers, strip_prefix removes it from their names',
        same(keys, ['keras/moving_mean', 'keras/moving_variance', 'torch/moving_mean', 'torch/moving_variance']), show(keys));
      check('ExportStats answers the store\'s names', same(ep.layers, [K, Q]), show(ep.layers));
      const back = expectOk('ImportStats add_prefix', await call('ImportStats', { safetensors: ep.safetensors, names: ['keras'], add_prefix: `${P}io/copy/` }));
      if (back) check('ImportStats puts the file\'s names under add_prefix', same(back.layers, [`${P}io/copy/keras`]), show(back.layers));
      expectError('ImportStats add_prefix that makes no valid name', await call('ImportStats', { safetensors: ep.safetensors, add_prefix: 'a//' }),
        grpc.status.INVALID_ARGUMENT, { type: 'normsvc.v1.ImportStatsRequest', field: 'add_prefix' });
    }
    expectError('ExportStats names and prefix', await call('ExportStats', { names: [K], prefix: `${P}io/` }), grpc.status.INVALID_ARGUMENT,
      { type: E, field: 'prefix' });
    expectError('ExportStats a prefix no layer has', await call('ExportStats', { prefix: `${P}io/none/` }), grpc.status.INVALID_ARGUMENT,
      { type: E, field: 'prefix' });
    expectError('ExportStats strip_prefix a layer lacks', await call('ExportStats', { names: [K], strip_prefix: `${P}other/` }),
      grpc.status.INVALID_ARGUMENT, { type: E, field: 'strip_prefix', layer: K });

    if (ek) {
      const before = await get(K);
      await call('DeleteLayer', { name: K });
      const im = expectOk('ImportStats of an exported file', await call('ImportStats', { safetensors: ek.safetensors }));
      if (im) {
        check('ImportStats answers the layers', same(im.layers, [K]), show(im.layers));
        const after = await get(K);
        check('ImportStats recreates the layer with its config and statistics', same(after.config, before.config) &&
          same(read(after.stats.mean).values, read(before.stats.mean).values) &&
          same(read(after.stats.variance).values, read(before.stats.variance).values), show([before, after]));
      }
    }
    const I = 'normsvc.v1.ImportStatsRequest';
    const garbage = Buffer.from('this is not a safetensors file at all');
    const g = await call('ImportStats', { safetensors: garbage });
    expectError('ImportStats of bytes that are no safetensors file', g, grpc.status.INVALID_ARGUMENT, { type: I, field: 'safetensors' });
    expectError('ImportStats of no bytes', await call('ImportStats', {}), grpc.status.INVALID_ARGUMENT, { type: I, field: 'safetensors' });
    if (ek) {
      expectError('ImportStats naming 7', await call('ImportStats', { safetensors: ek.safetensors, naming: 7 }), grpc.status.INVALID_ARGUMENT,
        { type: I, field: 'naming' });
      expectError('ImportStats names a layer the file lacks', await call('ImportStats', { safetensors: ek.safetensors, names: [`${P}io/other`] }),
        grpc.status.INVALID_ARGUMENT, { type: I, request: { names: [`${P}io/other`] } });
      expectError('ImportStats an empty name', await call('ImportStats', { safetensors: ek.safetensors, names: [''] }),
        grpc.status.INVALID_ARGUMENT, { type: I, request: { names: [''] }, field: 'names[0]' });
    }
  });

  await section('DeleteLayer', async () => {
    const L = `${P}del/a`;
    await mustCreate(L);
    expectOk('DeleteLayer', await call('DeleteLayer', { name: L }));
    expectError('GetLayer after DeleteLayer', await call('GetLayer', { names: [L] }), grpc.status.NOT_FOUND, { layer: L });
    expectError('DeleteLayer again', await call('DeleteLayer', { name: L }), grpc.status.NOT_FOUND, { layer: L });
    expectError('DeleteLayer with an empty name', await call('DeleteLayer', { name: '' }), grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.DeleteLayerRequest', field: 'name' });
  });

  await section('requests the server cannot parse', async () => {
    const junk = Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);  // field 1, length far beyond the message
    for (const method of ['CreateLayer', 'UpdateStats', 'Normalize', 'ExportStats']) {
      const r = await rawUnary(raw, `/${SERVICE}/${method}`, junk);
      const d = expectError(`${method} with undecodable bytes`, r, grpc.status.INVALID_ARGUMENT,
        { type: `normsvc.v1.${method}Request`, reason: 'MALFORMED_REQUEST' });
      if (d) check(`${method} with undecodable bytes: BadRequest blames field 1`, d.BadRequest !== undefined, d.types.join(', '));
    }
    const cut = Buffer.from([0xff]);  // ends inside a field's tag: no field to blame
    expectError('GetLayer with bytes that end inside a tag', await rawUnary(raw, `/${SERVICE}/GetLayer`, cut), grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.GetLayerRequest', reason: 'MALFORMED_REQUEST' });
    const Upd = root.lookupType('normsvc.v1.UpdateStatsRequest');
    const good = Buffer.from(Upd.encode(Upd.fromObject({ updates: [{ layer: `${P}x`, moments: moments(2, [1], [1]) }] })).finish());
    const badUtf8 = Buffer.concat([good, Buffer.from([0x0a, 0x04, 0x0a, 0x02, 0xc3, 0x28])]);  // updates[1].layer: not UTF-8
    expectError('UpdateStats whose second layer name is not UTF-8', await rawUnary(raw, `/${SERVICE}/UpdateStats`, badUtf8),
      grpc.status.INVALID_ARGUMENT, { type: 'normsvc.v1.UpdateStatsRequest', field: 'updates[1].layer' });
    const w = await rawServerStream(raw, `/${SERVICE}/WatchLayer`, junk);
    expectError('WatchLayer with undecodable bytes', { err: w.err, value: w.messages }, grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.WatchLayerRequest' });
    const s = await rawBidi(raw, `/${SERVICE}/NormalizeStream`, [junk]);
    expectError('NormalizeStream with undecodable bytes', { err: s.err, value: s.messages }, grpc.status.INVALID_ARGUMENT,
      { type: 'normsvc.v1.NormalizeStreamRequest' });
    const Req = root.lookupType('normsvc.v1.CreateLayerRequest');
    const known = Buffer.from(Req.encode(Req.fromObject({ name: `${P}unknown-fields` })).finish());
    const extra = Buffer.concat([known, Buffer.from([0xf8, 0x06, 0x01])]);  // field 111, varint 1
    const u = await rawUnary(raw, `/${SERVICE}/CreateLayer`, extra);
    check('a request with fields this server does not know is accepted', !u.err, u.err && u.err.details);
    const none = await rawUnary(raw, `/${SERVICE}/NoSuchMethod`, Buffer.alloc(0));
    check('an unknown method -> UNIMPLEMENTED', none.err && none.err.code === grpc.status.UNIMPLEMENTED,
      none.err ? CODE_NAMES[none.err.code] : 'succeeded');
  });

  if (config.auth) {
    await section('auth', async () => {
      const secured = new NormService(config.auth.target, credentials);
      const rawSecured = new grpc.Client(config.auth.target, credentials);
      const name = `${P}auth/a`;
      expectError('CreateLayer without a token', await unary(secured, 'CreateLayer', { name }), grpc.status.UNAUTHENTICATED);
      expectError('CreateLayer with an unknown token', await unary(secured, 'CreateLayer', { name }, { token: 'not-a-token' }),
        grpc.status.UNAUTHENTICATED);
      expectError('CreateLayer with a read token', await unary(secured, 'CreateLayer', { name }, { token: config.auth.reader }),
        grpc.status.PERMISSION_DENIED);
      expectOk('CreateLayer with an admin token', await unary(secured, 'CreateLayer', { name }, { token: config.auth.admin }));
      expectOk('GetLayer with a read token', await unary(secured, 'GetLayer', { names: [name] }, { token: config.auth.reader }));
      const h = await typedUnary(rawSecured, '/grpc.health.v1.Health/Check', 'grpc.health.v1.HealthCheckRequest',
        'grpc.health.v1.HealthCheckResponse', { service: '' });
      check('health needs no token', !h.err && h.value.status === 'SERVING', h.err ? h.err.details : show(h.value));
      for (const version of ['v1', 'v1alpha']) {
        const l = await reflect(rawSecured, version, { list_services: '*' });
        check(`reflection ${version} needs no token`, !l.err && l.value.list_services_response, l.err ? l.err.details : show(l.value));
      }
    });
  }

  console.log(`${passed} passed, ${failed} failed`);
  stub.close();
  raw.close();
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAILED  the contract run: ${e && e.stack ? e.stack : e}`);
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
});
