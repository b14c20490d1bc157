// A real OpenID Connect provider for the sign-in tests: node-oidc-provider (npm package
// oidc-provider, installed by scripts/oidc-provider.sh) with test clients, test accounts
// and a scripted password login. tests/dicomweb/test_oidc.py starts it as
//   node oidc-provider.mjs <folder holding node_modules> <port> <redirect URI>[,<another>...] [--no-logout]
// on 127.0.0.1 and stops it. Each client may come back after signing out
// (RP-initiated logout) to /viewer/signin at the origin of each redirect URI. Its clients and accounts are the test's constants: keep
// both files in step. Synthetic people only.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [, , moduleDir, portArg, redirectUris, ...flags] = process.argv;
// --no-logout: a provider without RP-initiated logout (no end_session_endpoint).
const logout = !flags.includes('--no-logout');
const { default: Provider } = await import(
  pathToFileURL(join(moduleDir, 'node_modules', 'oidc-provider', 'lib', 'index.js')).href
);
const port = Number(portArg);
const issuer = `http://127.0.0.1:${port}`;

// Who can sign in here (login -> password, subject, claims).
const ACCOUNTS = {
  alice: { password: 'alice-password', sub: 'a7c1e0f2-0001', claims: { name: 'Alice Example' } },
  mallory: { password: 'mallory-password', sub: 'b9d2f1a3-0002', claims: { name: 'Mallory' } },
  'dr.east': {
    password: 'east-password',
    sub: 'c4e3a2b1-0003',
    claims: { name: 'Dr East', institution: 'HOSP-EAST', role: 'radiologist' },
  },
  'dr.nowhere': {
    password: 'nowhere-password',
    sub: 'd5f4b3c2-0004',
    claims: { name: 'Dr Nowhere', institution: 'HOSP-NOWHERE', role: 'radiologist' },
  },
};

const client = (id, extra = {}) => ({
  client_id: id,
  client_secret: `${id}-secret-0123456789abcdef0123456789abcdef`,
  redirect_uris: redirectUris.split(','),
  // RP-initiated logout sends the browser back to the sign-in page of the same origin.
  post_logout_redirect_uris: redirectUris.split(',').map((uri) => new URL('/viewer/signin', uri).href),
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  ...extra,
});

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rsa-1', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: [
    client('studybridge'),
    client('other'), // a different relying party: its ID tokens are not for us
    client('short-lived'), // ID tokens expire after 2 seconds
    client('hs256', { id_token_signed_response_alg: 'HS256' }), // signed with its secret
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'profile', 'studybridge'],
  claims: { openid: ['sub'], profile: ['name'], studybridge: ['institution', 'role'] },
  conformIdTokenClaims: false, // claims of the granted scopes go into the ID token
  pkce: { required: () => true },
  enabledJWA: { idTokenSigningAlgValues: ['RS256', 'HS256'] },
  features: { devInteractions: { enabled: false }, rpInitiatedLogout: { enabled: logout } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: {
    AccessToken: 600,
    AuthorizationCode: 60,
    Grant: 3600,
    IdToken: (ctx, token, c) => (c.clientId === 'short-lived' ? 2 : 600),
    Interaction: 600,
    Session: 3600,
  },
  async findAccount(ctx, sub) {
    const account = Object.values(ACCOUNTS).find((a) => a.sub === sub);
    if (!account) return undefined;
    return { accountId: sub, claims: async () => ({ sub, ...account.claims }) };
  },
});

async function form(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return Object.fromEntries(new URLSearchParams(body));
}

// The login page: a form (GET), checked (POST .../login); consent is granted at once
// (these are first-party test clients).
provider.use(async (ctx, next) => {
  const match = ctx.path.match(/^\/interaction\/([\w-]+)(\/login)?$/);
  if (!match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  let result;
  if (details.prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    const missing = details.prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    result = { consent: { grantId: await grant.save() } };
  } else if (ctx.method === 'GET') {
    ctx.type = 'html';
    ctx.body = `<form method="post" action="/interaction/${match[1]}/login">
      <input name="login"><input name="password" type="password"><button>Sign in</button></form>`;
    return undefined;
  } else {
    const { login, password } = await form(ctx.req);
    const account = Object.hasOwn(ACCOUNTS, login) ? ACCOUNTS[login] : undefined;
    if (!account || account.password !== password) {
      ctx.status = 401;
      ctx.body = 'wrong login or password';
      return undefined;
    }
    result = { login: { accountId: account.sub } };
  }
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
    mergeWithLastSubmission: details.prompt.name === 'consent',
  });
  ctx.status = 303;
  ctx.redirect(returnTo);
  return undefined;
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ready at ${issuer}`);
});
