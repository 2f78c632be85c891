with

source as (

    select * from {{ source('ops', 'consent_events') }}

),

renamed as (

    select
        event_id as consent_event_id,
        event_key,
        phone_e164,
        contact_id,
        purpose,
        action,
        source as consent_source,
        consent_text,
        proof,
        cast(occurred_at as timestamp) as occurred_at,
        cast(recorded_at as timestamp) as recorded_at

    from source

)

select * from renamed
