// @stomp/stompjs under Node over TCP (@stomp/tcp-wrapper) against stompd: connect, subscribe,
// publish, ack, nack, transactions, heart-beats, binary bodies. Prints TAP lines
// (`ok - NAME` / `not ok - NAME`) that ../run.sh counts. Every wait is bounded.
import { Client, Versions } from '@stomp/stompjs';
import { TCPWrapper } from '@stomp/tcp-wrapper';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';

const HOST = process.env.STOMPD_HOST || '127.0.0.1';
const PORT = Number(process.env.STOMPD_PORT || 61613);
const AUTH_PORT = process.env.STOMPD_AUTH_PORT ? Number(process.env.STOMPD_AUTH_PORT) : null;
const USER = process.env.STOMPD_USER || 'interop';
const PASSCODE = process.env.STOMPD_PASSCODE || '';
const FULL = (process.env.STOMPD_FLAVOR || 'stompd') === 'stompd';
const WAIT_MS = 5000;

let failed = 0;

async function check(name, body) {
  let timer;
  try {
    await Promise.race([
      body(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('test exceeded 30 s')), 30000);
      }),
    ]);
    console.log(`ok - stompjs: ${name}`);
  } catch (error) {
    failed += 1;
    console.log(`not ok - stompjs: ${name}`);
    console.log(`#   ${String(error && error.stack ? error.stack : error).replace(/\n/g, '\n#   ')}`);
  } finally {
    clearTimeout(timer);
  }
}

function skip(name, why) {
  console.log(`# SKIP stompjs: ${name} (${why})`);
}

function fresh(kind, label) {
  return `/${kind}/interop-js-${label}-${randomBytes(4).toString('hex')}`;
}

function equal(actual, wanted, what) {
  if (actual !== wanted) {
    throw new Error(`${what}: wanted ${JSON.stringify(wanted)}, got ${JSON.stringify(actual)}`);
  }
}

// A bounded async queue of things the client hands to callbacks.
class Inbox {
  constructor(what) {
    this.what = what;
    this.items = [];
    this.waiters = [];
  }
  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.items.push(item);
  }
  next(what = this.what) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== done);
        reject(new Error(`no ${what} within ${WAIT_MS} ms`));
      }, WAIT_MS);
      const done = (item) => {
        clearTimeout(timer);
        resolve(item);
      };
      this.waiters.push(done);
    });
  }
}

// Connects; resolves with { client, connected, debug } once CONNECTED arrives, rejects on
// an ERROR frame or a close before it.
function connect({ port = PORT, login, passcode, heartbeat = 0, versions } = {}) {
  const debug = [];
  const errors = new Inbox('ERROR frame');
  const connectHeaders = { host: 'localhost' };
  if (login !== undefined) connectHeaders.login = login;
  if (passcode !== undefined) connectHeaders.passcode = passcode;
  const client = new Client({
    webSocketFactory: () => new TCPWrapper(HOST, port),
    connectHeaders,
    reconnectDelay: 0,
    heartbeatIncoming: heartbeat,
    heartbeatOutgoing: heartbeat,
    debug: (line) => debug.push(line),
    ...(versions ? { stompVersions: new Versions(versions) } : {}),
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.deactivate();
      reject(new Error(`no CONNECTED within ${WAIT_MS} ms; debug: ${debug.slice(-5).join(' | ')}`));
    }, WAIT_MS);
    client.onConnect = (frame) => {
      clearTimeout(timer);
      resolve({ client, connected: frame, debug, errors });
    };
    client.onStompError = (frame) => {
      errors.push(frame);
      clearTimeout(timer);
      client.deactivate();
      const error = new Error(`ERROR frame: ${frame.headers.message}`);
      error.frame = frame;
      reject(error);
    };
    client.onWebSocketClose = () => {
      clearTimeout(timer);
      reject(new Error(`closed before CONNECTED; debug: ${debug.slice(-5).join(' | ')}`));
    };
    client.activate();
  });
}

// Subscribes and waits for the broker's RECEIPT, so a publish that follows cannot race it.
async function subscribe(client, destination, headers = {}) {
  const inbox = new Inbox(`MESSAGE on ${destination}`);
  const receipt = `sub-${randomBytes(4).toString('hex')}`;
  const receipted = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  const subscription = client.subscribe(destination, (message) => inbox.push(message), {
    ...headers,
    receipt,
  });
  await withTimeout(receipted, `RECEIPT for SUBSCRIBE ${destination}`);
  return { inbox, subscription };
}

function withTimeout(promise, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no ${what} within ${WAIT_MS} ms`)), WAIT_MS);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function publishWithReceipt(client, params) {
  const receipt = `pub-${randomBytes(4).toString('hex')}`;
  const receipted = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  client.publish({ ...params, headers: { ...(params.headers || {}), receipt } });
  await withTimeout(receipted, `RECEIPT for SEND to ${params.destination}`);
}

const stompjsVersion = JSON.parse(
  readFileSync(new URL('./node_modules/@stomp/stompjs/package.json', import.meta.url)),
).version;

await check('connect negotiates 1.2 (spec: Connecting)', async () => {
  const { client, connected } = await connect();
  equal(connected.headers.version, '1.2', 'CONNECTED version');
  await client.deactivate();
});

await check('subscribe and publish on a topic (spec: SUBSCRIBE, SEND, MESSAGE)', async () => {
  const { client } = await connect();
  const destination = fresh('topic', 'basic');
  const { inbox } = await subscribe(client, destination);
  client.publish({ destination, body: 'hello from stompjs ✓', headers: { 'x-lang': 'js' } });
  const message = await inbox.next();
  equal(message.body, 'hello from stompjs ✓', 'body');
  equal(message.headers.destination, destination, 'destination');
  if (FULL) equal(message.headers['x-lang'], 'js', 'user header');
  await client.deactivate();
});

await check('binary body with NUL bytes (spec: Frames, content-length)', async () => {
  const { client } = await connect();
  const destination = fresh('topic', 'binary');
  const { inbox } = await subscribe(client, destination);
  const body = new Uint8Array(512);
  for (let i = 0; i < body.length; i += 1) body[i] = i % 256;
  client.publish({ destination, binaryBody: body, headers: { 'content-type': 'application/octet-stream' } });
  const message = await inbox.next();
  equal(Buffer.from(message.binaryBody).equals(Buffer.from(body)), true, 'binary body unchanged');
  await client.deactivate();
});

if (FULL) {
  await check('client-individual ack: acked is gone, unacked is redelivered (spec: ACK)', async () => {
    const destination = fresh('queue', 'ack');
    const first = await connect();
    await publishWithReceipt(first.client, { destination, body: 'acked' });
    await publishWithReceipt(first.client, { destination, body: 'not acked' });
    const { inbox } = await subscribe(first.client, destination, { ack: 'client-individual' });
    const acked = await inbox.next();
    equal(acked.body, 'acked', 'first delivery');
    const unacked = await inbox.next();
    equal(unacked.body, 'not acked', 'second delivery');
    acked.ack({ receipt: 'ack-receipt' });
    await withTimeout(
      new Promise((resolve) => first.client.watchForReceipt('ack-receipt', resolve)),
      'RECEIPT for ACK',
    );
    await first.client.deactivate();

    const second = await connect();
    const again = await subscribe(second.client, destination, { ack: 'client-individual' });
    const redelivered = await again.inbox.next('the redelivery');
    equal(redelivered.body, 'not acked', 'only the unacked message comes back');
    redelivered.ack();
    await second.client.deactivate();
  });

  await check('nack redelivers (spec: NACK)', async () => {
    const destination = fresh('queue', 'nack');
    const { client } = await connect();
    const { inbox } = await subscribe(client, destination, { ack: 'client-individual' });
    client.publish({ destination, body: 'nack me' });
    const message = await inbox.next();
    message.nack();
    const again = await inbox.next('the redelivery after NACK');
    equal(again.body, 'nack me', 'redelivered body');
    again.ack();
    await client.deactivate();
  });

  await check('transactions: commit delivers, abort discards (spec: BEGIN, COMMIT, ABORT)', async () => {
    const destination = fresh('queue', 'tx');
    const { client } = await connect();
    const { inbox } = await subscribe(client, destination);
    const aborted = client.begin();
    client.publish({ destination, body: 'aborted', headers: { transaction: aborted.id } });
    aborted.abort();
    const committed = client.begin();
    client.publish({ destination, body: 'committed', headers: { transaction: committed.id } });
    client.publish({ destination, body: 'outside' });
    equal((await inbox.next()).body, 'outside', 'the non-transactional message first');
    committed.commit();
    equal((await inbox.next()).body, 'committed', 'the committed message');
    await client.deactivate();
  });

  await check('heart-beats both ways keep an idle connection (spec: Heart-beating)', async () => {
    const { client, connected, debug } = await connect({ heartbeat: 1000 });
    const [sx, sy] = connected.headers['heart-beat'].split(',').map(Number);
    if (!(sx > 0 && sy > 0)) throw new Error(`CONNECTED heart-beat ${connected.headers['heart-beat']}`);
    // stompjs logs '<<< PONG' for each EOL from the broker and '>>> PING' for its own. The EOL
    // that ends CONNECTED counts as one PONG too, so 3 mean at least 2 real heart-beats.
    const deadline = Date.now() + WAIT_MS;
    while (debug.filter((l) => l === '<<< PONG').length < 3 || debug.filter((l) => l === '>>> PING').length < 2) {
      if (Date.now() > deadline) {
        throw new Error(`heart-beats within ${WAIT_MS} ms: ${debug.filter((l) => /PING|PONG|activity/.test(l)).join(' | ')}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    if (debug.some((l) => l.startsWith('did not receive server activity'))) {
      throw new Error('stompjs saw the broker go silent');
    }
    equal(client.connected, true, 'still connected');
    const destination = fresh('topic', 'hb');
    const { inbox } = await subscribe(client, destination);
    client.publish({ destination, body: 'alive' });
    equal((await inbox.next()).body, 'alive', 'traffic after idle heart-beats');
    await client.deactivate();
  });

  for (const version of ['1.0', '1.1']) {
    await check(`${version} when asked for: connect, publish, subscribe, ack (spec: Protocol Negotiation, ACK)`, async () => {
      const destination = fresh('queue', `v${version}`);
      const { client, connected } = await connect({ versions: [version] });
      if (version !== '1.0') equal(connected.headers.version, version, 'CONNECTED version');
      await publishWithReceipt(client, { destination, body: `at ${version}` });
      const { inbox } = await subscribe(client, destination, { ack: 'client' });
      const message = await inbox.next();
      equal(message.body, `at ${version}`, 'body');
      message.ack({ receipt: `ack-${version}` });
      await withTimeout(
        new Promise((resolve) => client.watchForReceipt(`ack-${version}`, resolve)),
        'RECEIPT for ACK',
      );
      await client.deactivate();
      const again = await connect({ versions: [version] });
      const after = await subscribe(again.client, destination);
      again.client.publish({ destination, body: 'sentinel' });
      equal((await after.inbox.next()).body, 'sentinel', 'nothing left before the sentinel');
      await again.client.deactivate();
    });
  }
} else {
  skip('ack, nack, transactions, heart-beats', 'needs the full broker');
}

if (AUTH_PORT) {
  await check('login accepted, wrong passcode refused with ERROR (spec: CONNECT, ERROR)', async () => {
    const { client } = await connect({ port: AUTH_PORT, login: USER, passcode: PASSCODE });
    await client.deactivate();
    let refusal = null;
    try {
      const { client: wrong } = await connect({ port: AUTH_PORT, login: USER, passcode: `${PASSCODE}-wrong` });
      await wrong.deactivate();
    } catch (error) {
      refusal = error;
    }
    if (!refusal || !refusal.frame) throw new Error(`wrong passcode not refused with ERROR: ${refusal}`);
  });
} else {
  skip('login', 'no auth broker');
}

console.log(`# @stomp/stompjs ${stompjsVersion}: ${failed} failed`);
process.exit(failed ? 1 : 0);
