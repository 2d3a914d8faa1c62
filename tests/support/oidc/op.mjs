// The OpenID provider of the test suite: npm oidc-provider with a login page of our own
// that checks passwords (its development login accepts anyone). Consent is automatic.
// env OP_PORT, OP_CONFIG={"clients":[{"client_id","client_secret","redirect_uri"}],
//                        "accounts":{"alice":{"password","email","groups"}}}
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.env.OP_PORT), cfg = JSON.parse(process.env.OP_CONFIG);
const issuer = process.env.OP_ISSUER || `http://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const provider = new Provider(issuer, {
  clients: cfg.clients.map((c) => ({ client_id: c.client_id, client_secret: c.client_secret,
    redirect_uris: [c.redirect_uri], grant_types: ['authorization_code'], response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic' })),
  jwks: { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: 'k1', use: 'sig', alg: 'RS256' }] },
  cookies: { keys: ['test-cookie-key-0123456789'] },
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, i) => `/interaction/${i.uid}` },
  async findAccount(ctx, sub) {
    if (!cfg.accounts[sub]) return undefined;
    const { password, ...claims } = cfg.accounts[sub];
    return { accountId: sub, claims: async () => ({ sub, email_verified: true, ...claims }) };
  },
  renderError(ctx, out) { ctx.type = 'json'; ctx.body = out; },
});
const readBody = (req) => new Promise((ok, ko) => { let b = ''; req.setEncoding('utf8');
  req.on('data', (c) => { b += c; }); req.on('end', () => ok(b)); req.on('error', ko); });
provider.use(async (ctx, next) => {
  if (!/^\/interaction\/[\w-]+$/.test(ctx.path)) return next();
  const { uid, params } = await provider.interactionDetails(ctx.req, ctx.res);
  if (ctx.method === 'GET') {
    ctx.type = 'html';
    ctx.body = `<form method="post" action="/interaction/${uid}"><input name="username"><input type="password" name="password"></form>`;
    return;
  }
  const f = new URLSearchParams(await readBody(ctx.req)), user = f.get('username'), acct = cfg.accounts[user];
  let result = { error: 'access_denied', error_description: 'invalid credentials' };
  if (acct && acct.password === f.get('password')) {
    const grant = new provider.Grant({ accountId: user, clientId: params.client_id });
    grant.addOIDCScope(params.scope);
    result = { login: { accountId: user }, consent: { grantId: await grant.save() } };
  }
  ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false }));
});
provider.listen(port, '127.0.0.1', () => console.log(`OP listening ${issuer}`));
process.on('SIGTERM', () => process.exit(0));
