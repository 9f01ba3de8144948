//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document, built from the same route table that
//! builds the router, so a route cannot exist without being documented or vice versa.

use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{Access, routes};

fn schemas() -> Value {
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
            "required": ["code", "message"], "properties": {
                "code": {"type": "string", "description": "snake_case, e.g. validation_failed, password_change_required"},
                "message": {"type": "string"},
                "fields": {"type": "object", "additionalProperties": {"type": "string"}, "description": "422 only: every offending field"}}}}},
        "Login": {"type": "object", "required": ["email", "password"], "properties": {
            "email": {"type": "string"}, "password": {"type": "string"}}},
        "Activate": {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}},
        "Lease": {"type": "object", "required": ["months"], "properties": {"months": {"type": "integer", "minimum": 1, "maximum": 120}}},
        "Command": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9_]{1,32}$", "examples": ["self_test", "report_now"]},
            "args": {"type": "object", "description": "passed to the device as sent (at most 4096 bytes of JSON)"},
            "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 604800, "default": 3600,
                "description": "undelivered after this long, the command is expired"}}},
        "Resend": {"type": "object", "required": ["email"], "properties": {"email": {"type": "string"}}},
        "ChangePassword": {"type": "object", "required": ["current_password", "new_password"], "properties": {
            "current_password": {"type": "string"}, "new_password": {"type": "string", "minLength": 10}}},
        "Location": {"type": "object", "required": ["lat", "lon"], "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}}},
        "CertificateRequest": {"description": "Empty body: the gateway makes the key pair. With csr_pem: the device keeps its key.",
            "type": "object", "properties": {"csr_pem": {"type": "string"}}},
        "Registration": {"type": "object", "required": ["user", "company", "device", "ups", "start_date"], "properties": {
            "user": {"oneOf": [
                {"type": "object", "required": ["new"], "properties": {"new": {"type": "object",
                    "required": ["first_name", "last_name", "email", "phone"], "properties": {
                        "first_name": {"type": "string"}, "last_name": {"type": "string"},
                        "email": {"type": "string"}, "phone": {"type": "string"}}}}},
                {"type": "object", "required": ["existing"], "properties": {"existing": {"type": "object",
                    "required": ["email"], "properties": {"email": {"type": "string"}}}}}]},
            "company": {"oneOf": [
                {"type": "object", "required": ["new"], "properties": {"new": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
                {"type": "object", "required": ["existing"], "properties": {"existing": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]},
            "sales_order": {"type": "string"},
            "device": {"type": "object", "required": ["serial", "mac"], "properties": {
                "type": {"type": "string", "default": "RemotEye 4"},
                "serial": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
                "mac": {"type": "string", "description": "00:1B:2C:3D:4E:5F, 00-1B-2C-3D-4E-5F or 001B2C3D4E5F"},
                "lease_months": {"type": "integer", "minimum": 1, "maximum": 120, "default": 12}}},
            "ups": {"type": "object", "required": ["model", "model_number", "serial"], "properties": {
                "model": {"type": "string"}, "model_number": {"type": "string"}, "serial": {"type": "string"},
                "ship_date": {"type": "string", "format": "date"}}},
            "start_date": {"type": "string", "format": "date"},
            "service_contract_sales_order": {"type": "string"},
            "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}
    })
}

pub(super) fn build() -> Value {
    let mut paths = Map::new();
    for r in routes() {
        let mut op = json!({
            "summary": r.summary,
            "responses": {
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        let ok = match (r.method, r.path) {
            ("POST", "/api/v1/registrations") => "201",
            (_, p) if p.ends_with("/password") || p.ends_with("/logout") => "204",
            _ => "200",
        };
        op["responses"][ok] = json!({"description": "success"});
        if matches!(r.access, Access::LoggedIn) {
            op["security"] = json!([{"bearerAuth": []}]);
            op["responses"]["401"] = json!({"description": "no or invalid token"});
        }
        if r.path.contains("{serial}") {
            op["parameters"] = json!([{"name": "serial", "in": "path", "required": true, "schema": {"type": "string"}}]);
            op["responses"]["404"] = json!({"description": "no such device, or not visible to the caller (the same answer)"});
        }
        if let Some(schema) = r.body {
            op["requestBody"] = json!({"required": schema != "CertificateRequest",
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
        }
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tms-gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Operator API of the RemotEye 4 gateway: registration, accounts, fleet, certificates."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        }
    })
}

pub(super) async fn document() -> Response {
    axum::Json(build()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_every_schema_reference_resolves() {
        let doc = build();
        let schemas = schemas();
        for r in routes() {
            let op = &doc["paths"][r.path][r.method.to_lowercase()];
            assert!(op.is_object(), "{} {} undocumented", r.method, r.path);
            if let Some(name) = r.body {
                assert!(schemas[name].is_object(), "schema {name} missing");
            }
        }
        assert!(doc["paths"]["/api/v1/devices/{serial}/certificate"]["delete"].is_object());
    }
}
