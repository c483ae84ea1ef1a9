// oidc-provider (v9) configured as a strict OAuth2 server for credproxy's
// tests: client credentials, authorization code with PKCE (S256) required,
// refresh-token rotation for confidential clients, revocation and
// introspection, short access-token lifetimes, and a non-interactive login.
//
// Test-only routes (never in a real provider):
//   GET  /interaction/:uid       logs in TEST_ACCOUNT and grants the requested scopes
//                                (OIDC_INTERACTIVE=1: the provider's own login and consent pages)
//   ANY  /resource               protected resource: 200 for a live access token, else 401
//   GET  /test/counts            grants issued, by grant_type
//   GET  /test/clients           per client_id: authorizations, grants by grant_type, revocations
//   GET  /test/secrets           every token, code and PKCE verifier seen (for secret scans)
//   POST /test/revoke-access     destroys every access token issued so far
//   POST /test/revoke-refresh    destroys every refresh token issued so far
//   GET  /test/active            how many issued access/refresh tokens are still active
//   POST /test/token-delay?ms=N  delays every token endpoint response by N ms
//   POST /test/token-fail?status=N  the next token requests fail with status N (0 = off;
//                                200 = a success without an access_token; with &body=html an
//                                HTML page, with &body=garbage truncated JSON)
//
// Prints "LISTENING http://127.0.0.1:PORT" once ready. Binds 127.0.0.1:0.
import http from 'node:http';
import Provider from 'oidc-provider';

const ACCESS_TTL = Number(process.env.OIDC_ACCESS_TTL || 5);
// OIDC_INTERACTIVE=1: oidc-provider's own login and consent pages (its
// devInteractions), filled in by a browser, instead of the automatic login.
const INTERACTIVE = process.env.OIDC_INTERACTIVE === '1';
const TEST_ACCOUNT = 'test-user';

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const counts = {};
const issued = { access: [], refresh: [], clientCredentials: [] };
let tokenDelayMs = 0;
let tokenFailStatus = 0;
let tokenFailBody = '';

const clients = [
  {
    client_id: 'cp-basic',
    client_secret: 'cp-basic-client-secret-8f2e1c',
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'cp-post',
    client_secret: 'cp-post-client-secret-4b7d9a',
    token_endpoint_auth_method: 'client_secret_post',
  },
  // An organization's own OAuth app (credproxy's per-organization apps).
  {
    client_id: 'cp-org-a',
    client_secret: 'cp-org-a-client-secret-71d3e5',
    token_endpoint_auth_method: 'client_secret_basic',
  },
].map((c) => ({
  ...c,
  application_type: 'native', // loopback redirect URIs match on any port (RFC 8252)
  grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
  response_types: ['code'],
  redirect_uris: ['http://127.0.0.1/oauth2/callback'],
  scope: 'openid offline_access profile api:read',
}));

const provider = new Provider(issuer, {
  clients,
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: INTERACTIVE },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
  },
  scopes: ['openid', 'offline_access', 'profile', 'api:read'],
  ttl: {
    AccessToken: ACCESS_TTL,
    ClientCredentials: ACCESS_TTL,
    AuthorizationCode: 60,
    RefreshToken: 3600,
    Grant: 3600,
    Interaction: 600,
    Session: 3600,
  },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: () => true,
  findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
  ...(INTERACTIVE ? {} : { interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` } }),
});

const exchanged = { codes: [], verifiers: [] };
// What each client did: the provider's own records of who asked.
const byClient = {};
const bump = (ctx, what) => {
  const id = ctx.oidc?.client?.clientId || '(none)';
  byClient[id] = byClient[id] || {};
  byClient[id][what] = (byClient[id][what] || 0) + 1;
};
provider.on('authorization.success', (ctx) => bump(ctx, 'authorize'));
provider.on('grant.revoked', (ctx) => bump(ctx, 'revoked'));
provider.on('grant.success', (ctx) => {
  const p = ctx.oidc.params;
  bump(ctx, p.grant_type);
  counts[p.grant_type] = (counts[p.grant_type] || 0) + 1;
  if (p.code) exchanged.codes.push(p.code);
  if (p.code_verifier) exchanged.verifiers.push(p.code_verifier);
});
provider.on('access_token.saved', (t) => issued.access.push(t.jti));
provider.on('client_credentials.saved', (t) => issued.clientCredentials.push(t.jti));
provider.on('refresh_token.saved', (t) => issued.refresh.push(t.jti));

async function liveToken(value) {
  if (!value) return undefined;
  return (await provider.AccessToken.find(value)) || (await provider.ClientCredentials.find(value));
}

async function countActive(model, ids) {
  let n = 0;
  for (const id of ids) {
    const t = await model.find(id);
    if (t && !t.isExpired) n += 1;
  }
  return n;
}

provider.use(async (ctx, next) => {
  const json = (status, body) => {
    ctx.status = status;
    ctx.type = 'application/json';
    ctx.body = JSON.stringify(body);
  };
  if (ctx.path === '/token' && ctx.method === 'POST') {
    if (tokenDelayMs) {
      await new Promise((r) => setTimeout(r, tokenDelayMs));
      // A client that died while we waited gets nothing processed: its
      // refresh never happened (the crash-safety test relies on this).
      if (ctx.req.socket.destroyed) {
        ctx.respond = false;
        return undefined;
      }
    }
    // 200 answers without an access token (a provider's odd success).
    if (tokenFailStatus === 200 && tokenFailBody === 'html') {
      ctx.status = 200;
      ctx.type = 'text/html';
      ctx.body = '<html><body><h1>We have moved</h1></body></html>';
      return undefined;
    }
    if (tokenFailStatus === 200 && tokenFailBody === 'garbage') {
      ctx.status = 200;
      ctx.type = 'application/json';
      ctx.body = '{"access_token": "trunc';
      return undefined;
    }
    if (tokenFailStatus === 200) return json(200, { token_type: 'Bearer', expires_in: 60 });
    if (tokenFailStatus) return json(tokenFailStatus, { error: 'temporarily_unavailable' });
    return next();
  }
  const interaction = ctx.path.match(/^\/interaction\/([^/]+)$/);
  if (interaction && ctx.method === 'GET' && !INTERACTIVE) {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    const { prompt, params, grantId } = details;
    if (prompt.name === 'login') {
      await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: TEST_ACCOUNT } }, { mergeWithLastSubmission: false });
    } else {
      const grant = grantId
        ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: TEST_ACCOUNT, clientId: params.client_id });
      if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
      if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
      for (const [indicator, scope] of Object.entries(prompt.details.missingResourceScopes || {})) {
        grant.addResourceScope(indicator, scope.join(' '));
      }
      const result = { consent: { grantId: await grant.save() } };
      await provider.interactionFinished(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
    }
    ctx.respond = false;
    return undefined;
  }
  if (ctx.path === '/resource') {
    const auth = ctx.get('authorization') || '';
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : undefined;
    const live = await liveToken(token);
    if (!live) {
      ctx.set('WWW-Authenticate', 'Bearer error="invalid_token"');
      return json(401, { error: 'invalid_token' });
    }
    return json(200, { ok: true, client_id: live.clientId, account: live.accountId || null });
  }
  if (ctx.path === '/test/counts') return json(200, counts);
  if (ctx.path === '/test/clients') return json(200, byClient);
  if (ctx.path === '/test/secrets') {
    // Opaque token values are their ids: every secret that crossed this server.
    return json(200, { ...issued, ...exchanged });
  }
  if (ctx.path === '/test/active') {
    return json(200, {
      access: await countActive(provider.AccessToken, issued.access),
      client_credentials: await countActive(provider.ClientCredentials, issued.clientCredentials),
      refresh: await countActive(provider.RefreshToken, issued.refresh),
    });
  }
  if (ctx.path === '/test/revoke-access' && ctx.method === 'POST') {
    for (const id of issued.access) await (await provider.AccessToken.find(id))?.destroy();
    for (const id of issued.clientCredentials) await (await provider.ClientCredentials.find(id))?.destroy();
    return json(200, { ok: true });
  }
  if (ctx.path === '/test/revoke-refresh' && ctx.method === 'POST') {
    for (const id of issued.refresh) await (await provider.RefreshToken.find(id))?.destroy();
    return json(200, { ok: true });
  }
  if (ctx.path === '/test/token-delay' && ctx.method === 'POST') {
    tokenDelayMs = Number(ctx.query.ms || 0);
    return json(200, { ok: true });
  }
  if (ctx.path === '/test/token-fail' && ctx.method === 'POST') {
    tokenFailStatus = Number(ctx.query.status || 0);
    tokenFailBody = String(ctx.query.body || '');
    return json(200, { ok: true });
  }
  return next();
});

server.on('request', provider.callback());
process.stdout.write(`LISTENING ${issuer}\n`);
