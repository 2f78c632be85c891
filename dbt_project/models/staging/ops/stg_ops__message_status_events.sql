with

source as (

    select * from {{ source('ops', 'message_status_events') }}

),

renamed as (

    select
        event_id as status_event_id,
        message_id,
        provider,
        provider_message_id,
        status,
        error_code,
        cast(occurred_at as timestamp) as occurred_at,
        cast(received_at as timestamp) as received_at

    from source

)

select * from renamed
