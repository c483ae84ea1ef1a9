// A Node client the way a workflow runner would be set up: undici's
// EnvHttpProxyAgent as the global dispatcher (reads HTTP_PROXY / HTTPS_PROXY,
// user info included), trusting credproxy's CA through NODE_EXTRA_CA_CERTS —
// or, with PROXY_TOKEN, a ProxyAgent for PROXY_URI with that token
// (Proxy-Authorization: Bearer). Fetches TARGET, with X-Connection-Id: CONN
// when CONN is set, and prints {status, headers, body} as JSON.
import { EnvHttpProxyAgent, ProxyAgent, setGlobalDispatcher } from 'undici';

const token = process.env.PROXY_TOKEN;
setGlobalDispatcher(
  token ? new ProxyAgent({ uri: process.env.PROXY_URI, token: `Bearer ${token}` }) : new EnvHttpProxyAgent(),
);
const headers = process.env.CONN ? { 'X-Connection-Id': process.env.CONN } : {};
const res = await fetch(process.env.TARGET, { headers });
const body = await res.text();
process.stdout.write(JSON.stringify({ status: res.status, headers: Object.fromEntries(res.headers), body }));
