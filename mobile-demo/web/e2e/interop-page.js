// Bundled with MQTT.js (browser build) and run inside Chromium by
// mqttjs.interop.mjs: MQTT.js talks to chatmq over WebSocket exactly as a
// web page would. window.runInterop returns one {name, ok, detail} per
// check instead of throwing, so the runner can print them all.

import mqtt from 'mqtt';

const WAIT_MS = 5000;

function connect(url, protocolVersion, user, clientId) {
  const client = mqtt.connect(url, {
    protocolVersion,
    clientId,
    username: user,
    password: `${user}-demo`,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: WAIT_MS,
  });
  return new Promise((resolve, reject) => {
    const fail = (why) => {
      client.end(true);
      reject(new Error(`${user} could not connect: ${why}`));
    };
    const timer = setTimeout(() => fail('no CONNACK within 5 s'), WAIT_MS);
    client.once('connect', () => {
      clearTimeout(timer);
      resolve(client);
    });
    client.once('error', (e) => {
      clearTimeout(timer);
      fail(e.message);
    });
    client.once('close', () => {
      clearTimeout(timer);
      fail('connection closed');
    });
  });
}

/** The next message on `client` whose topic satisfies `match`. */
function nextMessage(client, match) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.removeListener('message', on);
      reject(new Error('no message within 5 s'));
    }, WAIT_MS);
    function on(topic, payload, packet) {
      if (!match(topic)) return;
      clearTimeout(timer);
      client.removeListener('message', on);
      resolve({ topic, text: new TextDecoder().decode(payload), packet });
    }
    client.on('message', on);
  });
}

window.runInterop = async ({ url, protocolVersion: pv, run }) => {
  const results = [];
  const check = async (name, fn) => {
    try {
      const detail = await fn();
      results.push({ name: `v${pv === 5 ? '5' : '3.1.1'} ${name}`, ok: true, detail: detail ?? '' });
    } catch (e) {
      results.push({ name: `v${pv === 5 ? '5' : '3.1.1'} ${name}`, ok: false, detail: String(e && e.message ? e.message : e) });
    }
  };
  const expect = (cond, message) => { if (!cond) throw new Error(message); };
  const base = `interop/${run}/v${pv}`;
  let alice;
  let bob;

  await check('alice and bob connect over WebSocket', async () => {
    alice = await connect(url, pv, 'alice', `mqttjs-${run}-v${pv}-alice`);
    bob = await connect(url, pv, 'bob', `mqttjs-${run}-v${pv}-bob`);
    return `connected to ${url}`;
  });
  if (!alice || !bob) return results;

  await check('subscribe (QoS 2 granted)', async () => {
    const granted = await bob.subscribeAsync(`${base}/#`, { qos: 2 });
    expect(granted[0].qos === 2, `granted ${JSON.stringify(granted)}`);
  });

  for (const qos of [0, 1, 2]) {
    await check(`QoS ${qos} publish round trip`, async () => {
      const topic = `${base}/q${qos}`;
      const got = nextMessage(bob, (t) => t === topic);
      await alice.publishAsync(topic, `payload at qos ${qos}`, { qos });
      const m = await got;
      expect(m.text === `payload at qos ${qos}`, `payload ${m.text}`);
      expect(m.packet.qos === qos, `delivered at QoS ${m.packet.qos}`);
    });
  }

  await check('retained message reaches a later subscriber', async () => {
    const topic = `${base}/retained`;
    await alice.publishAsync(topic, 'kept', { qos: 1, retain: true });
    const late = await connect(url, pv, 'alice', `mqttjs-${run}-v${pv}-late`);
    try {
      const got = nextMessage(late, (t) => t === topic);
      await late.subscribeAsync(topic, { qos: 1 });
      const m = await got;
      expect(m.text === 'kept' && m.packet.retain === true, `got ${m.text}, retain ${m.packet.retain}`);
    } finally {
      await late.endAsync();
    }
  });

  if (pv === 5) {
    await check('user property carried to the subscriber', async () => {
      const topic = `${base}/props`;
      const got = nextMessage(bob, (t) => t === topic);
      await alice.publishAsync(topic, 'with properties', { qos: 1, properties: { userProperties: { trace: `t-${run}` }, contentType: 'text/plain' } });
      const m = await got;
      const props = m.packet.properties || {};
      expect(props.userProperties && props.userProperties.trace === `t-${run}`, `properties ${JSON.stringify(props)}`);
      expect(props.contentType === 'text/plain', `content type ${props.contentType}`);
    });

    await check('RPC answered on the Response Topic with the Correlation Data', async () => {
      const replies = `${base}/replies`;
      await alice.subscribeAsync(replies, { qos: 1 });
      const got = nextMessage(alice, (t) => t === replies);
      await alice.publishAsync('rpc/conversations', JSON.stringify({ id: 'c1' }), {
        qos: 1,
        properties: { responseTopic: replies, correlationData: new TextEncoder().encode(`corr-${run}`) },
      });
      const m = await got;
      const reply = JSON.parse(m.text);
      const corr = new TextDecoder().decode(m.packet.properties.correlationData);
      expect(reply.ok === true && Array.isArray(reply.result.conversations), `reply ${m.text}`);
      expect(corr === `corr-${run}`, `correlation data ${corr}`);
    });
  }

  await check('chat envelope round trip: bob gets it with a seq', async () => {
    await bob.subscribeAsync('chat/+', { qos: 1 });
    const id = `mqttjs-${run}-v${pv}`;
    const got = nextMessage(bob, (t) => t === 'chat/dm:alice:bob');
    await alice.publishAsync('chat/dm:alice:bob', JSON.stringify({ id, body: { text: `hello from MQTT.js v${pv}` } }), { qos: 1 });
    const m = await got;
    const env = JSON.parse(m.text);
    expect(env.id === id && env.from === 'alice' && env.conv === 'dm:alice:bob', `envelope ${m.text}`);
    expect(Number.isInteger(env.seq) && env.seq >= 1, `seq ${env.seq}`);
    expect(env.body.text === `hello from MQTT.js v${pv}`, `body ${JSON.stringify(env.body)}`);
    return `seq ${env.seq}`;
  });

  if (pv === 4) {
    await check('a non-member publish is reported on users/bob/events', async () => {
      await bob.subscribeAsync('users/bob/events', { qos: 1 });
      const got = nextMessage(bob, (t) => t === 'users/bob/events');
      await bob.publishAsync('chat/dm:alice:carol', JSON.stringify({ id: `x-${run}`, body: 'no' }), { qos: 1 });
      const event = JSON.parse((await got).text);
      expect(event.type === 'error' && event.code === 'not_member' && event.id === `x-${run}`, `event ${JSON.stringify(event)}`);
    });
  } else {
    await check('a non-member publish is refused with PUBACK 0x87', async () => {
      try {
        await bob.publishAsync('chat/dm:alice:carol', JSON.stringify({ id: `x-${run}`, body: 'no' }), { qos: 1 });
      } catch (e) {
        expect(e.code === 0x87, `refused with ${e.code}`);
        return;
      }
      throw new Error('the publish was accepted');
    });
  }

  await alice.endAsync();
  await bob.endAsync();
  return results;
};
