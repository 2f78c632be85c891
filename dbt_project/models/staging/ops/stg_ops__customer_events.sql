with

source as (

    select * from {{ source('ops', 'customer_events') }}

),

renamed as (

    select
        event_id as customer_event_id,
        event_key,
        contact_id,
        event_type,
        cast(occurred_at as timestamp) as occurred_at,
        properties

    from source

)

select * from renamed
