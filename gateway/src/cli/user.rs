//! `tms-gateway user …`: staff accounts from the command line.

use super::*;

pub(super) async fn user_add(
    config: Config,
    email: String,
    role: StaffRole,
    password_stdin: bool,
    clock: &SharedClock,
) -> Result<()> {
    if !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(usage(format!("--email {email:?} is not an email address")));
    }
    let (password, generated) = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        if password.chars().count() < 10 {
            return Err(usage("the password must have at least 10 characters"));
        }
        (password, false)
    } else {
        (auth::generate_password(), true)
    };
    let (store, _) = open_parts(&config, clock).await?;
    let hash =
        tokio::task::spawn_blocking(move || auth::hash_password(&password).map(|h| (h, password)))
            .await
            .context("hashing task")??;
    let role_name = match role {
        StaffRole::Admin => "admin",
        StaffRole::Provider => "provider",
    };
    let id = store
        .add_user(
            &NewUser {
                email: email.clone(),
                role: role_name.into(),
                password_hash: hash.0,
                first_name: None,
                last_name: None,
                phone: None,
                company_id: None,
                active: true,
                must_change_password: false,
            },
            clock.now_ms(),
        )
        .await
        .with_context(|| format!("creating account {email}"))?;
    println!("created {role_name} account {email} (id {id})");
    if generated {
        println!("password: {}", hash.1);
        println!("(shown once; it is stored only as an argon2id hash)");
    }
    store.close().await;
    Ok(())
}
