// Swagger UI over the gateway's own OpenAPI document. No validator badge (it would call an
// outside service); "Authorize" takes the API key, which Swagger UI keeps in memory only.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  tryItOutEnabled: false,
  persistAuthorization: false,
});
