with

source as (

    select * from {{ source('ops', 'orders') }}

),

renamed as (

    select
        order_id,
        external_id,
        contact_id,
        cast(ordered_at as timestamp) as ordered_at,
        cast(amount as double precision) as amount,
        currency,
        category,
        status as order_status,
        status = 'paid' as is_paid

    from source

)

select * from renamed
