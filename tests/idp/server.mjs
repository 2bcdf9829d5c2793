// The IdP of auth.wasm's introspection tests: panva's oidc-provider (an OpenID
// certified OAuth 2.0 server) with client credentials, RFC 7662 introspection and
// RFC 7009 revocation. `node server.mjs [run-dir]` listens on a free loopback port
// and prints `listening on 127.0.0.1:<port>`; the run directory only names the
// process for `make test`'s leftover check.
import Provider from 'oidc-provider';

const provider = new Provider('https://idp.test', {
  clients: [
    // The gateway: may introspect, obtains no tokens itself.
    { client_id: 'gateway', client_secret: 'gateway-secret', grant_types: [], redirect_uris: [], response_types: [] },
    // Applications calling the API through the gateway.
    { client_id: 'shop-app', client_secret: 'shop-secret', grant_types: ['client_credentials'], redirect_uris: [],
      response_types: [], scope: 'orders:read orders:write' },
    { client_id: 'reporting', client_secret: 'reporting-secret', grant_types: ['client_credentials'],
      redirect_uris: [], response_types: [], scope: 'reports:read' },
  ],
  scopes: ['orders:read', 'orders:write', 'reports:read'],
  features: {
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    devInteractions: { enabled: false },
  },
  ttl: { ClientCredentials: 600 },
});
// Quiet: the warnings about the development adapter and keys are expected here.
provider.on('server_error', (ctx, error) => console.error(`server_error: ${error}`));
const server = provider.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
