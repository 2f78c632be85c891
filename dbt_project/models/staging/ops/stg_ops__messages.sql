with

source as (

    select * from {{ source('ops', 'messages') }}

),

renamed as (

    select
        message_id,
        idempotency_key,
        campaign_id,
        variant,
        contact_id,
        phone_e164,
        body,
        encoding,
        segments,
        cast(price as double precision) as planned_price,
        currency,
        state as outbox_state,
        skip_reason,
        error_code as submit_error_code,
        provider,
        provider_message_id,
        cast(planned_at as timestamp) as planned_at,
        cast(not_before as timestamp) as not_before,
        cast(submitted_at as timestamp) as submitted_at,
        attempts

    from source

)

select * from renamed
