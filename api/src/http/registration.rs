//! `POST /api/v1/registrations`: customer + company + device in one transaction, with the
//! activation and password emails (seed steps 4–5). Every field is validated and every
//! problem named in one 422.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tms_model::{DeviceSerial, Mac};
use tms_registry::auth::{generate_password, new_token};
use tms_registry::provisioning::parse_date;
use tms_store::{
    DeviceDetails, NewDevice, NewUser, Registration, RegistrationCompany, RegistrationUser,
    StoreError,
};

use super::accounts::Caller;
use super::{ApiError, ApiState};

/// Collects field errors while reading a JSON body.
struct Fields<'a> {
    root: &'a Value,
    errors: BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    fn get(&self, path: &str) -> Option<&'a Value> {
        let mut v = self.root;
        for part in path.split('.') {
            v = v.get(part)?;
        }
        (!v.is_null()).then_some(v)
    }

    fn fail(&mut self, path: &str, problem: impl Into<String>) {
        self.errors
            .entry(path.to_owned())
            .or_insert_with(|| problem.into());
    }

    /// A trimmed string of 1..=max characters; `None` (and an error if required) otherwise.
    fn text(&mut self, path: &str, required: bool, max: usize) -> Option<String> {
        match self.get(path) {
            None if required => {
                self.fail(path, "is required");
                None
            }
            None => None,
            Some(Value::String(s)) => {
                let s = s.trim();
                if super::input::has_control(s) {
                    self.fail(path, "must not contain control characters");
                    None
                } else if s.is_empty() {
                    if required {
                        self.fail(path, "must not be empty");
                    }
                    None
                } else if s.chars().count() > max {
                    self.fail(path, format!("must be at most {max} characters"));
                    None
                } else {
                    Some(s.to_owned())
                }
            }
            Some(_) => {
                self.fail(path, "must be a string");
                None
            }
        }
    }

    fn date(&mut self, path: &str, required: bool) -> Option<String> {
        let s = self.text(path, required, 10)?;
        match parse_date(&s) {
            Some(d) => Some(d.to_string()),
            None => {
                self.fail(path, format!("{s:?} is not an ISO 8601 date (YYYY-MM-DD)"));
                None
            }
        }
    }

    fn object(&mut self, path: &str) -> Option<&'a Map<String, Value>> {
        match self.get(path) {
            Some(Value::Object(o)) => Some(o),
            Some(_) => {
                self.fail(path, "must be an object");
                None
            }
            None => {
                self.fail(path, "is required");
                None
            }
        }
    }

    /// `{"new": {...}}` or `{"existing": {...}}`.
    fn choice(&mut self, path: &str) -> Option<&'static str> {
        let o = self.object(path)?;
        match (o.contains_key("new"), o.contains_key("existing")) {
            (true, false) => Some("new"),
            (false, true) => Some("existing"),
            _ => {
                self.fail(path, "must hold exactly one of \"new\" or \"existing\"");
                None
            }
        }
    }
}

/// Email syntax good enough to reject typos: one `@`, a dotted domain, no spaces.
pub(crate) fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && s.len() <= 254
        && !s.contains(char::is_whitespace)
        && !domain.contains('@')
        && domain.contains('.')
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// Phone numbers: digits with the usual separators, 7 to 15 digits (E.164 length).
fn valid_phone(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    (7..=15).contains(&digits)
        && s.chars()
            .all(|c| c.is_ascii_digit() || " +-().".contains(c))
}

/// A validated registration, the new contact's email (empty for an existing user), and the
/// optional location given with it.
struct Validated {
    registration: Registration,
    contact: String,
    location: Option<(f64, f64)>,
}

fn validate(body: &Value) -> Result<Validated, ApiError> {
    let mut f = Fields {
        root: body,
        errors: BTreeMap::new(),
    };
    if !body.is_object() {
        f.fail("body", "must be a JSON object");
        return Err(ApiError::validation(f.errors));
    }
    let mut contact = None;
    let user = match f.choice("user") {
        Some("new") => {
            let email = f.text("user.new.email", true, 254);
            if let Some(e) = &email
                && !valid_email(e)
            {
                f.fail("user.new.email", format!("{e:?} is not an email address"));
            }
            let first = f.text("user.new.first_name", true, 100);
            let last = f.text("user.new.last_name", true, 100);
            let phone = f.text("user.new.phone", true, 40);
            if let Some(p) = &phone
                && !valid_phone(p)
            {
                f.fail(
                    "user.new.phone",
                    format!("{p:?} is not a phone number (7 to 15 digits)"),
                );
            }
            contact = email.clone();
            email.map(|email| {
                RegistrationUser::New(NewUser {
                    email,
                    role: "customer".into(),
                    password_hash: String::new(),
                    first_name: first,
                    last_name: last,
                    phone,
                    company_id: None,
                    active: false,
                    must_change_password: true,
                })
            })
        }
        Some(_) => {
            let email = f.text("user.existing.email", true, 254);
            if let Some(e) = &email
                && !valid_email(e)
            {
                f.fail(
                    "user.existing.email",
                    format!("{e:?} is not an email address"),
                );
            }
            email.map(|email| RegistrationUser::Existing { email })
        }
        None => None,
    };
    let company = match f.choice("company") {
        Some("new") => f
            .text("company.new.name", true, 200)
            .map(|name| RegistrationCompany::New { name }),
        Some(_) => f
            .text("company.existing.name", true, 200)
            .map(|name| RegistrationCompany::Existing { name }),
        None => None,
    };
    let sales_order = f.text("sales_order", false, 64);
    let service_contract_sales_order = f.text("service_contract_sales_order", false, 64);
    f.object("device");
    let device_type = f
        .text("device.type", false, 64)
        .unwrap_or_else(|| "RemotEye 4".into());
    let serial = f
        .text("device.serial", true, 64)
        .and_then(|s| match DeviceSerial::parse(&s) {
            Ok(s) => Some(s),
            Err(_) => {
                f.fail(
                    "device.serial",
                    format!("{s:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'"),
                );
                None
            }
        });
    let mac = f
        .text("device.mac", true, 17)
        .and_then(|m| match Mac::parse(&m) {
            Ok(m) => Some(m),
            Err(e) => {
                f.fail("device.mac", e.to_string());
                None
            }
        });
    let lease_months = match f.get("device.lease_months") {
        None => Some(12),
        Some(v) => match v.as_i64() {
            Some(n) if (1..=120).contains(&n) => Some(n),
            _ => {
                f.fail(
                    "device.lease_months",
                    "must be a whole number of months from 1 to 120",
                );
                None
            }
        },
    };
    f.object("ups");
    let ups_model = f.text("ups.model", true, 64);
    let ups_model_number = f.text("ups.model_number", true, 64);
    let ups_serial = f.text("ups.serial", true, 64);
    let ups_ship_date = f.date("ups.ship_date", false);
    let start_date = f.date("start_date", true);
    let location = match (f.get("location.lat"), f.get("location.lon")) {
        (None, None) => None,
        (Some(lat), Some(lon)) => match (lat.as_f64(), lon.as_f64()) {
            (Some(lat), Some(lon)) => match tms_model::LatLon::new(lat, lon) {
                Ok(point) => Some((point.lat(), point.lon())),
                Err(e) => {
                    f.fail("location", e.to_string());
                    None
                }
            },
            _ => {
                f.fail("location", "lat and lon must be numbers");
                None
            }
        },
        _ => {
            f.fail("location", "needs both lat and lon");
            None
        }
    };

    if !f.errors.is_empty() {
        return Err(ApiError::validation(f.errors));
    }
    let (Some(user), Some(company), Some(serial), Some(mac), Some(lease_months), Some(start_date)) =
        (user, company, serial, mac, lease_months, start_date)
    else {
        // Every None above recorded an error, so this cannot be reached with an empty list.
        return Err(ApiError::bad_request("incomplete registration"));
    };
    let company_name = match &company {
        RegistrationCompany::New { name } | RegistrationCompany::Existing { name } => name.clone(),
    };
    Ok(Validated {
        registration: Registration {
            user,
            company,
            device: NewDevice {
                serial,
                mac,
                company: company_name,
                details: DeviceDetails {
                    device_type,
                    lease_months,
                    lease_ends_at: tms_registry::provisioning::lease_ends_at_ms(
                        &start_date,
                        lease_months,
                    )
                    .unwrap_or(0),
                    start_date,
                    ups_model,
                    ups_model_number,
                    ups_serial,
                    ups_ship_date,
                    sales_order,
                    service_contract_sales_order,
                    registered_by: None,
                },
            },
            activation: None,
            mails: Vec::new(),
        },
        contact: contact.unwrap_or_default(),
        location,
    })
}

pub(super) async fn register(
    State(s): State<ApiState>,
    caller: Caller,
    bytes: bytes::Bytes,
) -> Result<Response, ApiError> {
    caller.require_staff("only providers and admins register devices")?;
    let body: Value = super::input::body(&bytes)?;
    let Validated {
        registration: mut reg,
        contact,
        location,
    } = validate(&body)?;
    reg.device.details.registered_by = Some(caller.user.id);
    let now = s.clock.now_ms();
    let mut temporary = None;
    if let RegistrationUser::New(user) = &mut reg.user {
        let password = generate_password();
        let for_hash = password.clone();
        let ticket = super::accounts::password_ticket(&s)?;
        user.password_hash = super::accounts::hash(&ticket, for_hash).await?;
        drop(ticket);
        let (token, hash) = new_token();
        reg.activation = Some((hash, now + s.activation_ttl.as_millis() as i64));
        let activation = s
            .mail
            .activation(&contact, &token, s.activation_ttl.as_secs() / 3600)
            .map_err(|e| ApiError::internal("building the activation email", &e))?;
        let password_mail = s
            .mail
            .temporary_password(&contact, &password)
            .map_err(|e| ApiError::internal("building the password email", &e))?;
        reg.mails = vec![activation, password_mail];
        temporary = Some(());
    }
    let ids = match s.store.register(&reg, now).await {
        Ok(ids) => ids,
        Err(StoreError::NotFound { what: "company" }) => {
            return Err(ApiError::validation(BTreeMap::from([(
                "company.existing.name".to_owned(),
                "no company with this name".to_owned(),
            )])));
        }
        Err(StoreError::NotFound { what: "user" }) => {
            return Err(ApiError::validation(BTreeMap::from([(
                "user.existing.email".to_owned(),
                "no customer account with this email".to_owned(),
            )])));
        }
        Err(StoreError::Conflict {
            what: "user of another company",
        }) => {
            return Err(ApiError::validation(BTreeMap::from([(
                "company".to_owned(),
                "the existing user belongs to another company".to_owned(),
            )])));
        }
        Err(StoreError::Conflict { what }) => {
            let err = ApiError::from(StoreError::Conflict { what });
            return Err(match what {
                "device serial" => err.on_field("device.serial"),
                "device MAC" => err.on_field("device.mac"),
                "company name" => err.on_field("company.new.name"),
                "account email" => err.on_field("user.new.email"),
                _ => err,
            });
        }
        Err(e) => return Err(e.into()),
    };
    if let Some((lat, lon)) = location {
        s.store
            .set_location(&ids.device_serial, lat, lon, "registration", now)
            .await?;
    }
    if temporary.is_some() {
        s.mail_queued.notify_one();
    }
    tracing::info!(device.serial = %ids.device_serial, user.id = ids.user_id, by = caller.user.id, "device registered");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "user_id": ids.user_id,
            "company_id": ids.company_id,
            "device_serial": ids.device_serial,
            "user_created": ids.user_created,
            "company_created": ids.company_created,
            "emails": if ids.user_created { json!(["activation", "password"]) } else { json!([]) },
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_fields() {
        assert!(valid_email("ana@example.com"));
        for bad in [
            "ana",
            "ana@",
            "@x.com",
            "ana@example",
            "a b@x.com",
            "ana@x..com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
        assert!(valid_phone("+1 713 555 0100"));
        assert!(!valid_phone("call me"));
        assert!(!valid_phone("12345"));
    }
}
