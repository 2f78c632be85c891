with

source as (

    select * from {{ source('ops', 'inbound_messages') }}

),

renamed as (

    select
        inbound_id,
        provider,
        provider_message_id,
        from_e164,
        to_number,
        body,
        keyword,
        contact_id,
        in_reply_to as in_reply_to_message_id,
        cast(received_at as timestamp) as received_at

    from source

)

select * from renamed
