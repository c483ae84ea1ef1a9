// A Node client the way a workflow runner would be set up: undici's
// EnvHttpProxyAgent as the global dispatcher (reads HTTP_PROXY / HTTPS_PROXY),
// trusting credproxy's CA through NODE_EXTRA_CA_CERTS. Fetches TARGET with
// X-Connection-Id: CONN and prints {status, headers, body} as JSON.
import { EnvHttpProxyAgent, setGlobalDispatcher } from 'undici';

setGlobalDispatcher(new EnvHttpProxyAgent());
const res = await fetch(process.env.TARGET, { headers: { 'X-Connection-Id': process.env.CONN } });
const body = await res.text();
process.stdout.write(JSON.stringify({ status: res.status, headers: Object.fromEntries(res.headers), body }));
